"""A user's task, written against the public task seam only: a two-head regression whose shared
body has a BatchNorm1d, so its forward pass moves buffers (running statistics and a counter),
and whose data is a CSV file, like the README's example. The framework's guarantees must hold
for it as they do for the built-ins."""

from __future__ import annotations

import pyarrow.csv as csv
import torch
from torch import nn
from torch.utils.data import TensorDataset

from training.tasks import Loaded, Options, StepOutput, Task


class TwoHeadOptions(Options):
    hidden: int = 16


class TwoHeads(nn.Module):
    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.mean_head, self.spread_head = nn.Linear(hidden, 1), nn.Linear(hidden, 1)

    def forward(self, x):
        h = self.body(x)
        return self.mean_head(h).squeeze(1), self.spread_head(h).squeeze(1)


class TwoHeadRegression(Task[int]):  # load learns the number of inputs
    Options = TwoHeadOptions

    def check(self):
        table = csv.read_csv(self.data.fs.open_input_stream(self.data.path))
        return {"columns": table.column_names, "rows": table.num_rows}

    def load(self):
        table = csv.read_csv(self.data.fs.open_input_stream(self.data.path))
        ys = [torch.tensor(table[c].to_numpy(), dtype=torch.float32) for c in ("y1", "y2")]
        x = torch.stack(
            [torch.tensor(table[c].to_numpy(), dtype=torch.float32) for c in ("a", "b", "c")],
            dim=1,
        )
        n = len(x) - int(len(x) * self.data.val_fraction)
        train = TensorDataset(x[:n], ys[0][:n], ys[1][:n])
        return Loaded(train, TensorDataset(x[n:], ys[0][n:], ys[1][n:]), info=x.shape[1])

    def build_model(self, inputs: int):
        return TwoHeads(inputs, self.options.hidden)

    def batch(self, samples, ids, seed, *, training):
        return samples[ids]

    def step(self, model, batch):
        x, y1, y2 = batch
        mean, spread = model(x)
        loss = nn.functional.mse_loss(mean, y1) + nn.functional.mse_loss(spread, y2)
        return StepOutput(loss, {"loss": loss.detach() * len(x), "count": torch.tensor(len(x))})


def write_csv(path, rows: int = 512) -> None:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 3, generator=generator)
    y1 = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(rows, generator=generator)
    y2 = (x[:, 0] * x[:, 1]).abs()
    lines = ["a,b,c,y1,y2"] + [
        ",".join(f"{v:.6f}" for v in (*x[i].tolist(), y1[i].item(), y2[i].item()))
        for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")


class MeanTotals(TwoHeadRegression):
    """A common mistake: totals that are means, which do not add up over ranks."""

    def step(self, model, batch):
        out = super().step(model, batch)
        return StepOutput(out.loss, {"loss": out.loss.detach(), "count": torch.tensor(1)})


class NoDecayOnBiases(TwoHeadRegression):
    """Parameter groups as users write them: weight decay on weights only."""

    def param_groups(self, model):
        biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
        weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
        return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


class ForgetsTheHeads(TwoHeadRegression):
    def param_groups(self, model):
        return [{"params": list(model.body.parameters())}]

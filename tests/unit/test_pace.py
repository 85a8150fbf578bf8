"""Progress-line pace: steps/s over the last interval and the time left."""

from training.observability.pace import Pace, format_duration


def test_rate_and_eta_come_from_the_last_interval():
    pace = Pace()
    assert pace.describe(20, 340, now=100.0) == "ETA --"  # nothing measured yet
    assert pace.describe(40, 340, now=110.0) == "2.00 steps/s, ETA 2m30s"
    # A slow interval (a checkpoint pause) shows at once: 20 steps in 40 s.
    assert pace.describe(60, 340, now=150.0) == "0.50 steps/s, ETA 9m20s"


def test_a_restart_in_the_same_process_measures_afresh():
    pace = Pace()
    pace.describe(100, 300, now=0.0)
    assert pace.describe(40, 300, now=5.0) == "ETA --"
    assert pace.describe(60, 300, now=15.0) == "2.00 steps/s, ETA 2m00s"


def test_durations_read_naturally():
    assert format_duration(0.4) == "0s"
    assert format_duration(59.6) == "1m00s"
    assert format_duration(3725) == "1h02m"
    assert format_duration(-3) == "0s"

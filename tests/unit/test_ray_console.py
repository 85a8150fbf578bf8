"""Ray's console output that says nothing to act on is dropped, one message at a time: the
notice that the embedded cluster uses token authentication (its default; the warning that
authentication is off stays), and the echo of every report on every rank."""

from __future__ import annotations

import logging

from training.ray_internals import console


def test_only_the_notice_that_token_auth_is_on_is_dropped(caplog):
    console.quiet_token_auth_notice()
    console.quiet_token_auth_notice()  # once per driver call: one filter, not a growing list
    logger = logging.getLogger(console.TOKEN_AUTH_LOGGER)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=console.TOKEN_AUTH_LOGGER):
        logger.warning("Token authentication is enabled for this Ray cluster. Set ...")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone ...")
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "Token authentication is disabled for thi"
    ]


def test_rays_echo_of_every_report_is_quieted_at_its_own_logger(caplog):
    from ray.train.v2._internal.execution import context  # the module that echoes reports

    context.logger.setLevel(logging.NOTSET)
    with caplog.at_level(logging.INFO):  # a Ray Train worker's root logger: INFO
        assert context.logger.isEnabledFor(logging.INFO)
        console.quiet_report_echo()
        assert not context.logger.isEnabledFor(logging.INFO)  # "Reporting training result ..."
        assert context.logger.isEnabledFor(logging.WARNING)

"""TorchServe's keys are renewed before they expire, on the real services: TorchServe issuing 2-minute keys, the
nginx router and the keyrenew listener under supervisord (tests/key_renewal_soak.py), with steady traffic. After
3 minutes, longer than a key lives, predictions through the router and management calls still work, and the keys
in key_file.json are other ones."""

from __future__ import annotations

import json
import time

import pytest

from tests.key_renewal_soak import EXPIRY_MIN, SOAK_S, Soak, gap_figures, start_soak

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def key_renewal_soak(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Soak:
    """The session's soak: usually started beside the shared stack already (tests/conftest.py); else now."""
    soak = start_soak(request.session, tmp_path_factory, force=True)
    assert soak is not None
    return soak


def test_keys_are_renewed_before_they_expire_and_serving_keeps_answering(key_renewal_soak: Soak,
                                                                         record_property) -> None:
    waited = time.monotonic()
    obs = key_renewal_soak.result(timeout_s=900)
    waited = time.monotonic() - waited
    assert obs.error is None, f"{obs.error}\nlistener log:\n{obs.listener_log[-3000:]}"
    # TorchServe ran with 2-minute keys, set through the environment the listener reads too
    assert obs.env_expiry == str(EXPIRY_MIN) and f"token_expiration_min={EXPIRY_MIN}\n" in obs.config
    # the final checks came 3 minutes after the first keys were issued: they would have expired twice over
    assert obs.final_at - obs.issued_at >= SOAK_S

    # a prediction through the router answers, and a management call works
    assert obs.final_predictions[-1].status == 200, obs.final_predictions
    assert obs.final_versions == ["1"], obs.final_versions
    # the keys in key_file.json are new ones (the API key, which never expires, is not renewed)
    assert obs.final_keys["inference"] != obs.initial_keys["inference"]
    assert obs.final_keys["management"] != obs.initial_keys["management"]
    assert obs.final_keys["API"] == obs.initial_keys["API"]
    state = obs.renewal
    assert state is not None and state["ok"], json.dumps(state, indent=2)
    assert state["renewals"]["inference"] >= 1 and state["renewals"]["management"] >= 1, state["renewals"]
    assert all(h["ok"] for h in state["history"]), state["history"]

    figures = gap_figures(obs)
    # every refused request fell into a renewal's gap (TorchServe swapped the key, nginx not reloaded yet)
    assert figures["outside_gaps"] == [], figures["outside_gaps"][:10]
    # the pipeline's management calls never failed: a call crossed by a renewal is sent again with the new key
    assert figures["management_failures"] == [], figures["management_failures"]
    assert figures["requests"] > 100 and figures["management_calls"] > 10, figures

    summary = {
        "soak_wall_s": round(obs.wall_s, 1), "waited_in_test_s": round(waited, 1),
        "renewals": state["renewals"], "observed_lifetime_s": state["observed_lifetime_s"],
        "requests": figures["requests"], "non_200": figures["non_200"],
        "non_200_in_renewal_gaps": figures["non_200_in_gaps"], "gap_answers": figures["gap_statuses"],
        "router_live_s": figures["router_live_s"], "post_s": figures["post_s"],
        "management_calls": figures["management_calls"],
        "final_check_after_s": round(obs.final_at - obs.issued_at, 1), "soak_cpu_s": obs.cpu_s,
    }
    for key, value in summary.items():
        record_property(key, json.dumps(value))
    print(f"key renewal soak: {json.dumps(summary)}")

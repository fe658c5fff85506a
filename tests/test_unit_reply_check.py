"""reply_check reads list and status replies without pydantic (tailcallctl's start-up, issue 14):
it must never take a reply the models refuse, nor read one differently from them.  Checked
here against protocol.py's models on generated replies, each a real reply with a few fields
changed to awkward values (a float for an int, a numeric string, a bool, a time with no offset,
a field left out, ...)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from tailcalld import ctl, reply_check
from tailcalld.protocol import ListResult, SlotInfo, StatusResult, response_adapter
from test_unit_ctl import ok, run_verb

SLOT = SlotInfo(slot=268, syscall="fchmodat", function="h", dialect="bcc", prog_id=91, filename="h.c",
                source_sha256="ab" * 32, attached_at=datetime(2026, 12, 7, 12, 0, 1, 250_000, tzinfo=UTC),
                attached_by_uid=0, hook="exit", journal=True, variables={"x": "1"}, defines={"D": "2"},
                state="kernel-other", kernel_prog_id=90, hits=7, misses=3, timed_runs=5, timed_ns=900,
                events_emitted=4, events_lost=1, events_delivered=3)
STATUS = StatusResult(version="0.1.0", pid=42, started_at=datetime(2026, 12, 7, 12, 0, tzinfo=UTC), pin_dir="/p",
                      socket="/s", dispatcher_prog_id=5, dispatcher_link_id=6, adopted=False, upgraded_from=4,
                      slots_used=1, nr_slots=1024, hits_total=7, misses_total=3, miss_log_interval=10.0,
                      connections=1, timing_seconds_left=12.5, corrections=["slot 1: emptied"], events_emitted=4,
                      events_lost=1, events_delivered=3, events_subscribers=0, events_buffer_bytes=1 << 20)

AWKWARD = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.sampled_from([1.0, 7.0, -0.0, 1e300]),
    st.text(max_size=8), st.sampled_from(["7", "1.5", "true", "enter", "exit", "bcc", "libbpf", "object", "in-sync",
                                          "not-restored", "", " 7", "inf", "nan"]),
    st.sampled_from(["2026-12-07T12:00:00", "2026-12-07T12:00:00Z", "2026-12-07T12:00:00.5+02:00",
                     "2026-12-07 12:00:00", "2026-13-07T12:00:00Z", "2026-02-30T12:00:00Z", "2026-12-07T24:00:00Z",
                     "2026-12-07T12:00:60Z", "2026-12-07T12:00:00+24:00", "2026-12-07T12:00:00-23:59",
                     "2026-12-07T12:00:00.1234567Z", "0000-01-01T00:00:00Z", "1700000000", "2026-12-07"]),
    st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()), max_size=2),
    st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=2),
)


@st.composite
def changed(draw: st.DrawFn, model: BaseModel) -> dict[str, Any]:
    """The model's JSON with a few fields changed or left out, and maybe one it does not know."""
    raw = json.loads(model.model_dump_json())
    for name in draw(st.lists(st.sampled_from(sorted(raw)), max_size=3, unique=True)):
        if draw(st.booleans()):
            del raw[name]
        else:
            raw[name] = draw(AWKWARD)
    if draw(st.booleans()):
        raw["from_a_newer_daemon"] = draw(AWKWARD)
    return raw


def _same(view: Any, model: BaseModel) -> None:
    for name in type(model).model_fields:
        mine, theirs = getattr(view, name), getattr(model, name)
        assert mine == theirs or (isinstance(mine, float) and math.isnan(mine) and math.isnan(theirs)), name
        assert type(mine) is type(theirs) or isinstance(mine, datetime), (name, mine, theirs)
        if isinstance(mine, datetime):  # the same instant shown the same way
            assert (mine.utcoffset(), mine.isoformat()) == (theirs.utcoffset(), theirs.isoformat())


def _model_or_none(model: type[BaseModel], raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError:
        return None


@settings(max_examples=600, deadline=None)
@given(st.lists(changed(SLOT), max_size=3))
def test_list_is_read_as_the_model_reads_it(slots: list[dict[str, Any]]) -> None:
    raw = {"slots": slots}
    view, model = reply_check.list_result(raw), _model_or_none(ListResult, raw)
    if view is not None:
        assert model is not None, f"reply_check took a list reply the model refuses: {raw}"
        assert len(view.slots) == len(model.slots)
        for mine, theirs in zip(view.slots, model.slots, strict=True):
            _same(mine, theirs)


@settings(max_examples=600, deadline=None)
@given(changed(STATUS))
def test_status_is_read_as_the_model_reads_it(raw: dict[str, Any]) -> None:
    view, model = reply_check.status_result(raw), _model_or_none(StatusResult, raw)
    if view is not None:
        assert model is not None, f"reply_check took a status reply the model refuses: {raw}"
        _same(view, model)


def test_a_daemons_replies_are_read_plainly() -> None:
    """What the daemon writes (the models' own JSON) is what the plain reading is for."""
    for model in (SLOT, SlotInfo(slot=1, syscall="write", function=None, prog_id=2, filename=None,
                                 source_sha256=None, attached_at=None, misses=0)):
        view = reply_check.list_result({"slots": [json.loads(model.model_dump_json())]})
        assert view is not None
        _same(view.slots[0], model)
    view = reply_check.status_result(json.loads(STATUS.model_dump_json()))
    assert view is not None
    _same(view, STATUS)


@pytest.mark.parametrize(("spec", "model"), [(reply_check.SLOT_INFO, SlotInfo),
                                             (reply_check.STATUS_RESULT, StatusResult)])
def test_specs_name_the_models_fields_and_defaults(spec: reply_check.Spec, model: type[BaseModel]) -> None:
    """A field added to the model without its spec here fails (the plain reading would drop it)."""
    assert list(spec) == list(model.model_fields)
    for name, (_, default) in spec.items():
        field = model.model_fields[name]
        if default is reply_check.REQUIRED:
            assert field.is_required(), name
        else:
            assert not field.is_required() and field.get_default(call_default_factory=True) == default, name


ENVELOPE_PART = st.one_of(AWKWARD, st.just({"code": "slot_empty", "message": "m"}), st.just({"slots": []}),
                          st.just({"code": 1, "message": "m"}), st.just({"message": "m"}))


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "ok", "result", "error"]), ENVELOPE_PART))
def test_envelope_fits_only_what_the_adapter_takes(reply: dict[str, Any]) -> None:
    if reply_check.envelope_fits(reply):
        response_adapter.validate_python(reply)  # raises if the plain check was wrong


def test_envelopes() -> None:
    assert reply_check.envelope_fits({"id": 1, "ok": True, "result": {}})
    assert reply_check.envelope_fits({"id": None, "ok": False, "error": {"code": "c", "message": "m"}})
    assert not reply_check.envelope_fits({"ok": True, "result": {}})  # id is required, if null
    assert not reply_check.envelope_fits({"id": True, "ok": True, "result": {}})


# Through tailcallctl: a list or status reply the plain reading doubts still gets the model's word.

def test_list_reply_the_model_refuses_is_a_bad_reply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slot = json.loads(SLOT.model_dump_json())
    del slot["misses"]
    code, _ = run_verb(tmp_path, "list", [], ok(json.dumps({"slots": [slot]}).encode()))
    captured = capsys.readouterr()
    assert (code, captured.out) == (1, "")
    assert captured.err.startswith("tailcallctl: tailcalld's reply to list does not fit the protocol "
                                   "(slots.0.misses: Field required)")


def test_status_reply_the_model_refuses_is_a_bad_reply_in_json(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    status = {**json.loads(STATUS.model_dump_json()), "pid": "forty-two"}
    code, _ = run_verb(tmp_path, "status", [], ok(json.dumps(status).encode()), "--json")
    captured = capsys.readouterr()
    assert code == 1 and captured.err == ""
    assert json.loads(captured.out)["error"]["code"] == "bad_reply"


def test_list_reply_the_model_coerces_prints_as_before(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """"91" for a program id: the model takes it (lax), so tailcallctl shows it, as it always did."""
    slot = {**json.loads(SLOT.model_dump_json()), "prog_id": "91", "hits": 7.0}
    code, _ = run_verb(tmp_path, "list", ["--no-legend"], ok(json.dumps({"slots": [slot]}).encode()))
    assert code == 0
    ctl.show_list(ListResult.model_validate({"slots": [slot]}), ctl.build_parser().parse_args(["list", "--no-legend"]))
    first, second = capsys.readouterr().out.split("\n", 1)
    assert first + "\n" == second and "91 (kernel: 90)" in first

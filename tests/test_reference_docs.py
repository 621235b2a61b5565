"""The generated parts of docs/ say what the code does: every setting and every error code a
client can receive, printed from the code by compose/reference/ (`make docs`).

The first tests hold the committed documentation to the code; the others pin down what the
generator must catch, on synthetic sources and settings, so that a scanner that silently
stopped finding codes could not pass."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from compose.reference import blocks as reference
from compose.reference.blocks import stale_blocks
from compose.reference.common import ReferenceProblem
from compose.reference.configuration import configuration_markdown, variables
from compose.reference.error_codes import (
    Computed,
    Raised,
    error_classes,
    error_codes,
    resolve,
    scan_source,
    scan_tree,
)
from topics.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CLASSES = error_classes()


def raised_in(source: str, module: str = "ingress/example.py") -> list[Raised]:
    """What the scanner and resolver make of one synthetic module."""
    return resolve(scan_source(source, module, CLASSES), computed={}, body_status={})


# --------------------------------------------------------------- the committed documentation


def test_committed_reference_blocks_are_what_the_code_prints() -> None:
    assert stale_blocks() == [], "docs/ is out of step with the code: run `make docs`"


def test_configuration_reference_has_one_row_per_variable_settings_read() -> None:
    assert [v.name for v in variables()] == Settings.env_names()
    document = (ROOT / "docs/configuration.md").read_text()
    for name in Settings.env_names():
        assert f"| `{name}` |" in document


def test_error_reference_lists_every_code_the_tree_raises() -> None:
    document = (ROOT / "docs/errors.md").read_text()
    literal = {code for site in scan_tree() for code in site.codes or () if code is not None}
    assert literal, "the scanner found no codes at all in the tree"
    missing = sorted(code for code in literal if f"| `{code}` |" not in document)
    assert not missing


def test_codes_are_found_with_the_status_of_the_class_that_raises_them() -> None:
    rows = {(row.code, row.status) for row in error_codes(resolve(scan_tree()))}
    assert {("worker_lost", 502), ("deadline_exceeded", 504), ("tenant_mismatch", 403),
            ("invalid_api_key", 401),  # Unauthorized raised without a code: its default
            ("dependency_down", 503),  # a hand-built body in ingress/ops.py
            ("upstream_rate_limited", 429),  # computed: provider_error's taxonomy
            ("not_found", 404)} <= rows  # computed: Starlette's unknown route


def test_the_documented_configuration_shows_no_machine_path() -> None:
    document = (ROOT / "docs/configuration.md").read_text()
    assert str(ROOT) not in document
    assert "`workers/classifier/model/prompt-classifier-v1.onnx`" in document
    assert "`topics/catalog.toml`" in document


# ------------------------------------------------------------------ what the scanner finds


def test_a_code_raised_in_a_new_module_is_found() -> None:
    found = raised_in('def f(x):\n    raise Forbidden(f"no entry for {x}", code="synthetic")\n')
    assert found == [Raised("synthetic", 403, "permission_error", "ingress/example.py",
                            "no entry for {x}")]


def test_an_error_raised_without_a_code_has_its_class_default() -> None:
    found = raised_in('raise errors.Unauthorized("who are you")\n')
    assert [(r.code, r.status) for r in found] == [("invalid_api_key", 401)]


def test_each_branch_of_a_conditional_code_keeps_its_own_message() -> None:
    found = raised_in('raise GatewayTimeout("mine" if own else "the deadline",\n'
                      '                     code="attempt_timeout" if own else "deadline")\n')
    assert [(r.code, r.message) for r in found] == [("attempt_timeout", "mine"),
                                                    ("deadline", "the deadline")]


def test_a_module_constant_in_a_message_is_filled_in() -> None:
    found = raised_in('HEADER = "x-demo"\n'
                      'raise InvalidRequest(f"{HEADER} is wrong", code="bad_header")\n')
    assert found[0].message == "x-demo is wrong"


def test_a_hand_built_error_body_is_found_and_needs_a_status() -> None:
    source = 'body = {"message": "down", "type": "server_error", "code": "all_down"}\n'
    sites = scan_source(source, "ingress/example.py", CLASSES)
    with pytest.raises(ReferenceProblem, match="BODY_STATUS"):
        resolve(sites, computed={}, body_status={})
    found = resolve(sites, computed={}, body_status={"all_down": 503})
    assert [(r.code, r.status, r.type) for r in found] == [("all_down", 503, "server_error")]


def test_a_code_computed_at_run_time_must_be_listed() -> None:
    with pytest.raises(ReferenceProblem, match=r"ingress/example.py:2 in f"):
        raised_in('def f(kind):\n    raise InvalidRequest("bad", code=f"bad_{kind}")\n')


def test_an_error_class_chosen_at_run_time_must_be_listed() -> None:
    with pytest.raises(ReferenceProblem, match="COMPUTED"):
        raised_in('def f(cls):\n    raise cls("bad", code="literal_but_which_class")\n')


def test_a_listed_computed_site_resolves_to_what_its_entry_says() -> None:
    sites = scan_source('def f(kind):\n    raise InvalidRequest("x", code=kind)\n',
                        "ingress/example.py", CLASSES)
    entry = Computed("kind is one of two", lambda: [
        Raised("one", 400, "invalid_request_error", "ingress/example.py", "first"),
        Raised("two", 400, "invalid_request_error", "ingress/example.py", "second")])
    found = resolve(sites, computed={("ingress/example.py", "f"): entry}, body_status={})
    assert [r.code for r in found] == ["one", "two"]


def test_a_listed_computed_site_that_is_gone_fails() -> None:
    entry = Computed("moved away", list)
    with pytest.raises(ReferenceProblem, match="no longer exist"):
        resolve([], computed={("ingress/gone.py", "f"): entry}, body_status={})


def test_every_code_needs_a_meaning() -> None:
    found = raised_in('raise NotFound("no such thing", code="missing")\n'
                      'raise NotFound("nothing here", code="missing")\n'
                      'raise NotFound(message, code="opaque")\n')
    with pytest.raises(ReferenceProblem, match="missing, opaque"):
        error_codes(found, meanings={}, body_status={})
    rows = error_codes(found, meanings={"missing": "not there", "opaque": "hidden"},
                       body_status={})
    assert [(r.status, r.code, r.meaning) for r in rows] == [(404, "missing", "not there"),
                                                             (404, "opaque", "hidden")]


def test_a_meaning_for_a_code_nothing_raises_fails() -> None:
    with pytest.raises(ReferenceProblem, match="retired"):
        error_codes([], meanings={"retired": "gone"}, body_status={})


def test_rows_are_sorted_by_status_then_code() -> None:
    found = raised_in('raise Unavailable("b", code="b_code")\n'
                      'raise InvalidRequest("z", code="z_code")\n'
                      'raise Unavailable("a", code="a_code")\n')
    rows = error_codes(found, meanings={}, body_status={})
    assert [(r.status, r.code) for r in rows] == [(400, "z_code"), (503, "a_code"),
                                                  (503, "b_code")]


# ------------------------------------------------------------------- what the settings show


class _Section(BaseModel):
    """A section of synthetic settings."""

    token: SecretStr = Field(default=SecretStr("hunter2"), description="A secret.")
    limit: int = Field(default=3, ge=1, le=8, description="A bounded number.")


class _Synthetic(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_", env_nested_delimiter="__")

    section: _Section = _Section()
    where: Path = Field(default=ROOT / "topics/catalog.toml", description="A path.")


class _Undocumented(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_")

    silent: int = 1


def test_a_secret_default_is_never_printed() -> None:
    table = configuration_markdown(_Synthetic)
    assert "hunter2" not in table
    assert "| `DEMO_SECTION__TOKEN` | `SecretStr` | `**********` (secret) | A secret. |" in table


def test_bounds_and_repository_paths_are_shown_as_a_reader_needs_them() -> None:
    table = configuration_markdown(_Synthetic)
    assert "| `DEMO_SECTION__LIMIT` | `int` ≥ 1, ≤ 8 | `3` |" in table
    assert "| `DEMO_WHERE` | `Path` | `topics/catalog.toml` |" in table
    assert str(ROOT) not in table


def test_a_setting_without_a_description_stops_the_generator() -> None:
    with pytest.raises(ReferenceProblem, match="DEMO_SILENT"):
        configuration_markdown(_Undocumented)


# ---------------------------------------------------------------------- the check and rewrite


def test_check_names_the_block_that_differs_and_a_rewrite_restores_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    committed = (docs / "errors.md").read_text()
    (docs / "errors.md").write_text(committed.replace("| `worker_lost` |", "| `worker_gone` |"))

    assert reference.main(["--check"], docs=docs) == 1
    assert "docs/errors.md: errors" in capsys.readouterr().err
    assert stale_blocks(docs) == ["docs/errors.md: errors"]

    assert reference.main([], docs=docs) == 0
    assert (docs / "errors.md").read_text() == committed
    assert reference.main(["--check"], docs=docs) == 0


def test_a_document_without_its_markers_fails_loudly(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    (docs / "configuration.md").write_text("# Configuration\n\nno markers here\n")
    assert reference.main(["--check"], docs=docs) == 2

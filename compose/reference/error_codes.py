"""The error reference (docs/errors.md): the error tree's classes, the provider taxonomy, and
every code a client can receive, read from the source with `ast` (see the package's
docstring for what is scanned and how computed codes are listed)."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from compose.reference.common import ROOT, SCANNED, ReferenceProblem, require, table
from topics import errors as error_tree


@dataclass(frozen=True, slots=True)
class Site:
    """One place in the source that gives a client-visible error its code."""

    module: str  # path from the repository root, e.g. "ingress/policy.py"
    function: str  # enclosing qualified name, "<module>" at top level
    line: int
    error_class: str | None  # a class of topics/errors.py; None: chosen at run time or a body
    codes: tuple[str | None, ...] | None  # literal codes (None: the class default); None: computed
    message: str | None  # the message literal, run-time parts shown as {name}
    body_type: str | None = None  # the `type` literal of a hand-built error body


@dataclass(frozen=True, slots=True)
class Raised:
    """A code a client can receive, with the status and type it comes with."""

    code: str
    status: int
    type: str
    module: str
    message: str | None


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One row of the error reference."""

    status: int
    type: str
    code: str
    modules: tuple[str, ...]
    meaning: str


@dataclass(frozen=True, slots=True)
class Computed:
    """How a computed site resolves: `why` is printed nowhere, it is for the next reader."""

    why: str
    resolve: Callable[[], list[Raised]]


def error_classes() -> dict[str, type[error_tree.SwitchyardError]]:
    """Every class of the error tree by name, the root included."""
    found: dict[str, type[error_tree.SwitchyardError]] = {}
    pending: list[type[error_tree.SwitchyardError]] = [error_tree.SwitchyardError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending += cls.__subclasses__()
    return found


def scan_source(source: str, module: str, classes: Iterable[str]) -> list[Site]:
    """The sites of one module's source. Takes source text, not a path, so that a test can
    show what the scanner finds in a snippet."""
    tree = ast.parse(source)
    scanner = _Scanner(module, frozenset(classes), _constants(tree))
    scanner.visit(tree)
    return scanner.sites


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level string constants (`MODE_HEADER = "x-switchyard-mode"`), so that a message
    naming one reads as the client sees it."""
    found: dict[str, str] = {}
    for stmt in tree.body:
        target = (stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                  else stmt.target if isinstance(stmt, ast.AnnAssign) else None)
        value = stmt.value if isinstance(stmt, ast.Assign | ast.AnnAssign) else None
        if (isinstance(target, ast.Name) and isinstance(value, ast.Constant)
                and isinstance(value.value, str)):
            found[target.id] = value.value
    return found


def scan_tree(root: Path = ROOT, packages: Iterable[str] = SCANNED) -> list[Site]:
    """Every site under the packages whose errors reach clients (compose/, bench/ and tests/
    raise none a client sees; the fake upstream's errors are the providers')."""
    classes = error_classes()
    return [site for package in packages for path in sorted((root / package).rglob("*.py"))
            for site in scan_source(path.read_text(), path.relative_to(root).as_posix(),
                                    classes)]


class _Scanner(ast.NodeVisitor):
    def __init__(self, module: str, classes: frozenset[str], constants: dict[str, str]) -> None:
        self.module = module
        self.classes = classes
        self.constants = constants
        self.scope: list[str] = []
        self.sites: list[Site] = []

    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def _site(self, node: ast.expr, error_class: str | None,
              codes: tuple[str | None, ...] | None, message: str | None,
              body_type: str | None = None) -> None:
        self.sites.append(Site(self.module, ".".join(self.scope) or "<module>", node.lineno,
                               error_class, codes, message, body_type))

    def visit_Call(self, node: ast.Call) -> None:
        callee = _callee(node.func)
        code = next((k.value for k in node.keywords if k.arg == "code"), None)
        if callee in self.classes or code is not None:
            known = callee if callee in self.classes else None
            for branch, message in _branches(code, _message(node)):
                codes = (None,) if branch is None else _literal_codes(branch)
                self._site(node, known, codes if known else None,
                           None if message is None else _text(message, self.constants))
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        fields = {k.value: v for k, v in zip(node.keys, node.values, strict=True)
                  if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        if "code" in fields and "message" in fields:
            kind = fields.get("type")
            self._site(node, None, _literal_codes(fields["code"]),
                       _text(fields["message"], self.constants),
                       kind.value if isinstance(kind, ast.Constant)
                       and isinstance(kind.value, str) else None)
        self.generic_visit(node)


def _callee(func: ast.expr) -> str | None:
    """`Forbidden(...)` and `errors.Forbidden(...)` both name Forbidden."""
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def _literal_codes(node: ast.expr) -> tuple[str | None, ...] | None:
    """The codes an expression can take when they are all written out, else None (computed).
    A None code means the error class's default."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, str)):
        return (node.value,)
    if isinstance(node, ast.IfExp):
        body, orelse = _literal_codes(node.body), _literal_codes(node.orelse)
        return body + orelse if body is not None and orelse is not None else None
    return None


def _message(call: ast.Call) -> ast.expr | None:
    if call.args:
        return call.args[0]
    return next((k.value for k in call.keywords if k.arg == "message"), None)


def _branches(code: ast.expr | None, message: ast.expr | None
              ) -> Iterator[tuple[ast.expr | None, ast.expr | None]]:
    """A code and a message chosen by the same condition, paired branch by branch, so that
    each code keeps its own message (`"a" if c else "b"`, `code="x" if c else "y"`)."""
    if (isinstance(code, ast.IfExp) and isinstance(message, ast.IfExp)
            and ast.dump(code.test) == ast.dump(message.test)):
        yield from _branches(code.body, message.body)
        yield from _branches(code.orelse, message.orelse)
    else:
        yield code, message


def _text(node: ast.expr, constants: Mapping[str, str]) -> str | None:
    """A string expression as a reader would see it: module constants filled in, other
    run-time parts as {name} (or {…} for anything longer than a name)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(part, constants) or "" for part in node.values)
    if isinstance(node, ast.FormattedValue):
        if isinstance(node.value, ast.Name) and node.value.id in constants:
            value = constants[node.value.id]
            return repr(value) if node.conversion == ord("r") else value
        simple = isinstance(node.value, ast.Name | ast.Attribute)
        return "{" + (ast.unparse(node.value) if simple else "…") + "}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left, constants), _text(node.right, constants)
        return left + right if left is not None and right is not None else None
    return None


def _raised(cls: type[error_tree.SwitchyardError], code: str | None, module: str,
            message: str | None) -> Raised:
    return Raised(code or cls.default_code, cls.status, cls.type, module, message)


def _taxonomy() -> list[tuple[str, type[error_tree.SwitchyardError], bool]]:
    """(kind, class, retryable) of each kind of provider failure, as provider_error() reads
    them; imported, not parsed, since the class is picked from a dict at run time."""
    from workers.providers import errors as provider_errors

    return [(kind.value, *provider_errors._TAXONOMY[kind]) for kind in provider_errors.Kind]


def _provider_taxonomy() -> list[Raised]:
    """provider_error() builds `upstream_<kind>` with the class its taxonomy assigns."""
    return [_raised(cls, f"upstream_{kind}", "workers/providers/errors.py", None)
            for kind, cls, _retryable in _taxonomy()]


def _starlette_not_found() -> list[Raised]:
    return [_raised(error_tree.NotFound, "not_found", "ingress/errors.py", None)]


# Sites whose code or class is decided at run time, and what they can produce.
COMPUTED: dict[tuple[str, str], Computed] = {
    ("topics/errors.py", "SwitchyardError.to_dict"): Computed(
        "serialises an error's own code; every code is documented where it is raised",
        list),
    ("topics/errors.py", "SwitchyardError.from_frame_data"): Computed(
        "rebuilds, in the ingress, an error a worker sent in an error frame: its code was set "
        "(and is documented) where the worker raised it", list),
    ("ingress/errors.py", "on_http_exception"): Computed(
        "Starlette's own HTTPException: 405 has its literal code; the routing table raises "
        "only 404 besides, as not_found (no module of ours raises HTTPException)",
        _starlette_not_found),
    ("ingress/errors.py", "anthropic_error_body"): Computed(
        "the Messages routes' shape of an error raised elsewhere: its code is that error's own",
        list),
    ("workers/providers/errors.py", "provider_error"): Computed(
        "f'upstream_{kind.value}' with the class _TAXONOMY gives each Kind", _provider_taxonomy),
    ("workers/router/execute.py", "_Run.failure"): Computed(
        "re-raises the last attempt's error with '(after N attempts)' in its message; the code "
        "is that error's own", list),
}

# Statuses of hand-built error bodies (dict literals), which the scanner cannot see.
BODY_STATUS: dict[str, int] = {
    "dependency_down": 503,  # ingress/ops.py: GET /v1/health when a dependency is down
}

# One-line meanings for codes whose messages do not say it alone (none, or several).
MEANINGS: dict[str, str] = {
    "invalid_provider": "`POST /v1/providers/register` (or test, or a PUT) with a `type` that "
                        "is neither a dialect, `openai-compatible` nor a provider of the "
                        "catalog, or without the `base_url` such a type needs",
    "provider_not_configured": "no key for the route's provider (none in the environment, "
                               "none in the tenant's vault, no offline fallback), or a "
                               "tenant's own provider deleted or disabled while the request "
                               "was being routed",
    "audit_unavailable": "an audited change (a vault key, the routing policy, ...) was applied, "
                         "but Kafka did not take its audit event within "
                         "`SWITCHYARD_AUDIT__PUBLISH_TIMEOUT_S`; the event is in the ingress's "
                         "log (docs/audit.md)",
    "attempt_timeout": "one call had its own time limit and missed it: a council member "
                       "(`SWITCHYARD_ROUTER__COUNCIL_MEMBER_TIMEOUT_S`) or the judge "
                       "(`SWITCHYARD_ROUTER__COUNCIL_JUDGE_TIMEOUT_S`)",
    "deadline_exceeded": "the request's deadline passed: in the queue (never executed) or during "
                         "the call",
    "dependency_down": "`GET /v1/health`: Kafka, Redis or PostgreSQL did not answer in time; "
                       "`checks` says which and why",
    "image_too_large": "a data-URL image is larger than `SWITCHYARD_INGRESS__MAX_IMAGE_BYTES`",
    "invalid_api_key": "the API key is unknown or revoked, or the Authorization header is not "
                       "`Bearer <key>`; on the batch path, the envelope's `key_id` is no key "
                       "of its `tenant_id`",
    "key_revoked": "the batch path (a request published to Kafka): the envelope's key has been "
                   "revoked; the router answered on the reply topic without calling a "
                   "provider",
    "tenant_not_found": "no such tenant, or one the caller may not see (another tenant's id "
                        "gets the same answer)",
    "key_expired": "the API key's expiry (`expires_at`) has passed, or a rotation's grace "
                   "period for it has ended",
    "role_not_grantable": "a key may create, rotate or revoke only keys whose role it could "
                          "hold itself (no key outranks its maker), and `platform_admin` keys "
                          "exist only in the platform administrators' own tenant",
    "unknown_model": "a model name that is not in the catalog, in a routing policy "
                     "(`allowed_models`, `pinned_routes`, `fallbacks`, `judge_model`) or in an "
                     "API key's `allowed_models`; `GET /v1/models` lists them",
    "permission_denied": "the caller's role lacks the permission the route requires; the "
                         "message names both (docs/tenancy.md lists each role's permissions)",
    "model_not_allowed": "the API key is limited to some models (`allowed_models`) and the "
                         "request names another",
    "tenant_suspended": "the tenant was suspended by a platform administrator; every key and "
                        "session of it is refused until it is resumed",
    "invalid_token": "a session token that does not verify: malformed, a bad signature, an "
                     "algorithm other than HS256, a wrong issuer or audience, a missing claim, "
                     "signed with a key id not configured (any more), or sessions are not "
                     "configured; the message says which",
    "token_expired": "the session token's `exp` has passed (`SWITCHYARD_AUTH__SESSION_TTL_S` "
                     "after login or refresh): log in again",
    "token_revoked": "the session token was logged out, or replaced by a refresh (a token "
                     "refreshes once): log in again",
    "session_token_required": "`POST /v1/auth/refresh` and `/logout` take a session token "
                              "as the bearer, not an API key",
    "unsupported_login": "`POST /v1/auth/login` with `email`/`password`: the gateway has no "
                         "user accounts; log in with `{\"api_key\": …}`",
    "sessions_not_configured": "no session signing key (`SWITCHYARD_AUTH__SIGNING_KEYS` "
                               "unset): logins answer 503, the rest of the gateway runs",
    "sessions_misconfigured": "`SWITCHYARD_AUTH__SIGNING_KEYS` or "
                              "`SWITCHYARD_AUTH__ACTIVE_SIGNING_KEY` is malformed (the message "
                              "says which key; never its value): the ingress does not start",
    "invalid_field": "a field fails validation; `param` names it (e.g. `messages.0.role`, "
                     "`weights.cost`, `policy.timeout_ms`, `models`)",
    "invalid_header": "`x-switchyard-category` is not a category, `x-switchyard-timeout-ms` "
                      "is not a number of milliseconds within "
                      "(0, `SWITCHYARD_INGRESS__MAX_DEADLINE_S`], `x-switchyard-cache` is not "
                      "`on`, `off` or `refresh`, or `x-switchyard-cache-ttl` is not whole "
                      "seconds within [1, `SWITCHYARD_CACHE__MAX_TTL_S`]",
    "invalid_json": "the body is not valid JSON, or not a JSON object",
    "invalid_query": "a query parameter is malformed or out of range (`period`, `start`, `end`, "
    "`group_by` of `GET /v1/usage` and `/v1/usage/history`); `param` names it",
    "invalid_request": "a request field that must be translated is malformed or has no "
                       "translation (`param` names it): for the chosen provider's dialect (e.g. a "
                       "message without content, a tool call without an id) or, on "
                       "`/v1/messages` and `/v1/responses`, for every route (e.g. a `document` "
                       "block, a server tool, an `input_file` part, a `web_search` tool, "
                       "`background` or `conversation`); or a chat completion sets the "
                       "reserved `switchyard_native`",
    "missing_field": "a required field is missing; `param` names it",
    "model_not_found": "the model (or council judge) is not in the catalog; `GET /v1/models` "
                       "lists them",
    "not_found": "no route matches the path",
    "previous_response_not_found": "`previous_response_id` names no stored response of the "
                                   "tenant: another tenant's, one sent with `store: false`, "
                                   "deleted, or past `SWITCHYARD_INGRESS__RESPONSES_TTL_S`",
    "response_not_found": "`GET` or `DELETE /v1/responses/{id}` names no stored response of "
                          "the tenant (the same reasons as `previous_response_not_found`)",
    "policy_conflict": "a routing policy (stored or the seed shape's `policy`) at odds with "
                       "itself or the catalog: a pinned route or judge that is not an eligible "
                       "chat model, a policy that admits no model, a pinned provider without such "
                       "a model",
    "queue_unavailable": "Kafka did not acknowledge the request (the request queue is down): "
                         "nothing was queued, retry later",
    "race_lost": "another route answered first (recorded for the losing attempt in usage events "
                 "and `metadata.attempts`; never the request's error)",
    "reply_incomplete": "the answer ended without its final frame",
    "request_too_large": "the body is larger than the route's limit: "
                         "`SWITCHYARD_INGRESS__MAX_BODY_BYTES` on model routes, 64 KiB on the "
                         "vault, routing-policy and admin routes, 4 KiB on `POST /v1/feedback`; "
                         "or, rarely, a body within it whose queued envelope is over "
                         "`SWITCHYARD_KAFKA__MAX_MESSAGE_BYTES` (re-serialised numbers grow)",
    "response_too_large": "the answer (a long completion, the embeddings of many inputs) is "
                          "larger than `SWITCHYARD_KAFKA__MAX_MESSAGE_BYTES`, the largest reply "
                          "frame the gateway relays",
    "unknown_provider": "a provider name that is not in the catalog (seed `policy.provider`, a "
                        "vault key, a routing policy's `allowed_providers`)",
    "unsupported_parameter": "a request parameter the route's provider cannot honour (refused, "
                             "never dropped); the message names the parameter and the provider",
    "upstream_auth": "the provider refused the gateway's (or the tenant's stored) key or account "
                     "(HTTP 401/403 or its equivalent): that route's breaker opens and the "
                     "request fails over to another route (another provider of the model "
                     "first); not retried on the same route",
    "upstream_bad_request": "the provider refused the request as invalid (another 4xx); not "
                            "retried",
    "upstream_bad_response": "the provider answered something that is not its wire format "
                             "(malformed JSON, a wrong shape, the wrong number of embeddings)",
    "upstream_context_length_exceeded": "the model said the prompt (and `max_tokens`) does not "
                                        "fit its context window; the router fails over to a "
                                        "model whose window is larger, if the request may go "
                                        "to one, and returns this if none answers",
    "context_length_exceeded": "the prompt and `max_tokens` surely exceed the context window of "
                               "every model that may serve the request (an estimate that errs "
                               "low; checked before any provider is called)",
    "upstream_content_filtered": "the provider refused the request's or the answer's content; not "
                                 "retried",
    "upstream_overloaded": "the provider says it is overloaded (HTTP 503/529 or its equivalent)",
    "budget_exceeded": "a hard spend budget (the tenant's or the key's, per UTC day or month) "
                       "would be exceeded by this request's worst-case cost; `details` gives "
                       "`budget_used_usd`, `budget_limit_usd`, `remaining_usd` (numbers) and "
                       "`reset_at` (docs/budgets.md)",
    "budgets_unavailable": "Redis cannot be reached to check a hard spend budget that fails "
                           "closed (the default); retry after `Retry-After` (docs/budgets.md)",
    "budget_not_found": "the tenant has no such budget (period, key) to delete",
    "upstream_rate_limited": "the provider rate-limited the gateway (HTTP 429 or its equivalent)",
    "rate_limit_exceeded": "a rate limit of the tenant or the key (requests per second or "
                           "minute, tokens per minute, concurrent requests; `param` names it) "
                           "refused the request, at the ingress or on the batch path; "
                           "`Retry-After` says when to come back (docs/limits.md)",
    "limits_unavailable": "the rate limits could not be checked (Redis unreachable) and the "
                          "tenant's limits fail closed; retry after `Retry-After`",
    "api_key_not_found": "the tenant has no API key with that id (`key_id`)",
    "limit_above_tier": "a tenant administrator asked for a rate limit above the tenant's "
                        "tier's; only a platform administrator may raise it",
    "upstream_server_error": "the provider failed (5xx, an error event inside its stream, an "
                             "unusable answer)",
    "upstream_stream_cut": "the provider ended the stream or the connection before the answer was "
                           "complete",
    "upstream_timeout": "the provider reported a timeout (HTTP 408/504), or missed the connect, "
                        "first-token, idle or total timeout",
    "vault_misconfigured": "`SWITCHYARD_VAULT__MASTER_KEYS` or `SWITCHYARD_VAULT__ACTIVE_KEY_ID` "
                           "is malformed (the message says which key; never its value)",
    "wrong_model_kind": "a model of the wrong kind for where it is named: an embeddings model on "
                        "chat completions (or the reverse), or a fallback of another kind than "
                        "the model it serves",
    "vault_not_configured": "the vault has no master key (`SWITCHYARD_VAULT__MASTER_KEYS` unset); "
                            "the rest of the gateway runs",
}


def resolve(sites: Iterable[Site], computed: Mapping[tuple[str, str], Computed] = COMPUTED,
            body_status: Mapping[str, int] = BODY_STATUS) -> list[Raised]:
    """Every (code, status, type, module) the sites can produce. Fails on a computed site that
    is not listed, a listed one that is gone, and a hand-built body without a status."""
    classes = error_classes()
    sites = list(sites)
    raised: list[Raised] = []
    unlisted: list[str] = []
    seen: set[tuple[str, str]] = set()
    for site in sites:
        key = (site.module, site.function)
        if site.codes is None or (site.error_class is None and site.body_type is None):
            if key not in computed:
                unlisted.append(f"{site.module}:{site.line} in {site.function}")
            elif key not in seen:
                seen.add(key)
                raised += computed[key].resolve()
        elif site.error_class is not None:
            raised += [_raised(classes[site.error_class], code, site.module, site.message)
                       for code in site.codes]
        else:
            raised += [_body(site, code, body_status) for code in site.codes]
    require(not unlisted, "error codes or classes decided at run time, not listed in COMPUTED in "
             "compose/reference/error_codes.py (say what they resolve to): " + "; ".join(unlisted))
    gone = sorted(f"{m} {f}" for m, f in set(computed) - {(s.module, s.function) for s in sites})
    require(not gone, "COMPUTED lists sites that no longer exist: " + "; ".join(gone))
    return raised


def _body(site: Site, code: str | None, body_status: Mapping[str, int]) -> Raised:
    if code is None or code not in body_status or site.body_type is None:
        raise ReferenceProblem(f"{site.module}:{site.line} builds an error body with code "
                               f"{code!r}: add its HTTP status to BODY_STATUS in "
                               "compose/reference/error_codes.py")
    return Raised(code, body_status[code], site.body_type, site.module, site.message)


def error_codes(raised: Iterable[Raised], meanings: Mapping[str, str] = MEANINGS,
                body_status: Mapping[str, int] = BODY_STATUS) -> list[ErrorCode]:
    """One row per (status, code, type), sorted by status then code, each with a meaning."""
    groups: dict[tuple[int, str, str], list[Raised]] = {}
    for item in raised:
        groups.setdefault((item.status, item.code, item.type), []).append(item)
    by_code: dict[str, list[Raised]] = {}
    for (_status, code, _type), items in groups.items():
        by_code.setdefault(code, []).extend(items)
    found = {code: _meaning(code, items, meanings) for code, items in by_code.items()}
    unexplained = sorted(code for code, meaning in found.items() if meaning is None)
    require(not unexplained, "error codes without a literal message, or with several "
            "different ones: add a one-line meaning to MEANINGS in "
            "compose/reference/error_codes.py: " + ", ".join(unexplained))
    stale = sorted((set(meanings) | set(body_status)) - set(by_code))
    require(not stale, "MEANINGS or BODY_STATUS in compose/reference/error_codes.py name "
            f"codes nothing raises any more: {', '.join(stale)}")
    return [ErrorCode(status, kind, code, tuple(sorted({r.module for r in items})),
                      str(found[code]))
            for (status, code, kind), items in sorted(groups.items())]


def _meaning(code: str, items: list[Raised], meanings: Mapping[str, str]) -> str | None:
    """The curated meaning, else the one message literal every site raises it with."""
    if code in meanings:
        return meanings[code]
    messages = {item.message for item in items}
    return messages.pop() if len(messages) == 1 else None


def errors_markdown(root: Path = ROOT) -> str:
    """Every code a client can receive, by status then code, with where it is raised."""
    rows = error_codes(resolve(scan_tree(root)))
    return "\n".join(table(
        ("status", "code", "type", "meaning", "raised in"),
        [(str(r.status), f"`{r.code}`", f"`{r.type}`", r.meaning,
          ", ".join(f"`{m}`" for m in r.modules)) for r in rows])) + "\n"


def error_classes_markdown() -> str:
    """The error tree itself: what each class means on the wire, by status."""
    classes = sorted(error_classes().values(), key=lambda c: (c.status, c.__name__))
    return "\n".join(table(
        ("class", "status", "type", "default code", "retryable by default"),
        [(f"`{c.__name__}`", str(c.status), f"`{c.type}`", f"`{c.default_code}`",
          "yes" if c.retryable else "no") for c in classes])) + "\n"


def provider_errors_markdown() -> str:
    """The provider taxonomy: what each kind of provider failure becomes for the client, and
    whether another route (or a later try) is attempted."""
    rows = [(f"`{kind}`", str(cls.status), f"`upstream_{kind}`", "yes" if retryable else "no")
            for kind, cls, retryable in _taxonomy()]
    return "\n".join(table(("kind", "status", "code", "retried on another route"),
                            rows)) + "\n"


# ----------------------------------------------------------------------------- the blocks


# block name → (document under docs/, what prints it)

"""The generated parts of docs/: the configuration table and the error reference.

Hand-kept reference tables drift from the code they describe, so these are printed from it.
`python -m compose.reference` (`make docs`) rewrites each block in place between its markers,
`<!-- generated:NAME -->` … `<!-- /generated:NAME -->`; `python -m compose.reference --check`
only compares, and exits 1 naming every block that differs. tests/test_reference_docs.py runs
the check, so a change to a setting or an error code that is not regenerated fails the tests.

Configuration comes from the settings models of topics/settings.py: one row per environment
variable, with its type and constraints, its default and the field's `description`. A field
without a description stops the generator: an undocumented setting is a bug.

Error codes are read from the source with `ast` rather than from a hand-kept list, so that a
code is found wherever it is raised and moves with the code. Under topics/, state/, ingress/
and workers/ the scanner collects:

- calls of an error class of topics/errors.py (status and `type` from the class) with a literal
  `code=` keyword, or with none (the class's default code); a conditional expression whose
  branches are literals counts as each branch;
- dict literals with "message" and "code" keys: error bodies built by hand (their `type` is the
  literal beside the code; their status, which only the response call knows, is in
  BODY_STATUS).

Everything else that sets a code -- a code computed at run time, or a call whose error class is
chosen at run time -- is a *computed site* and must be listed in COMPUTED, keyed by module and
enclosing function, with how it resolves. An unlisted computed site stops the generator, so a
new computed code cannot go undocumented; a listed site that no longer exists stops it too.

A code's one-line meaning is the message literal of the call that raises it. Where a code has
no literal message, or several different ones, MEANINGS says what it means instead; a code left
without a meaning stops the generator.

Modules: `common.py` (paths, the shared table writer, the one error), `configuration.py`,
`error_codes.py`, `routes.py`, and `blocks.py` (which block comes from where, and the
command).
"""

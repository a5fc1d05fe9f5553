"""README.md is executed: every ```python block runs, in order, in one namespace.

What the README shows is compared with what the code does:

* a line ``expression  # <literal> …`` (a comment that starts with a Python literal, such
  as ``# 'fail'`` or ``# ('b1', 'W2'), worst first``) asserts ``expression == literal``;
* a bare ```` ``` ```` (or ```` ```text ````) block right after a python block is that
  block's printed output, line by line, where a line ``...`` stands for any number of lines;
* ``gc.check(...)`` in "The cost contract" is the real signature.

Blocks that need what this machine lacks (CuPy and a GPU, PyTorch, JAX) are skipped with the reason;
blocks whose claim waits on another issue are xfail with its number.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import re
from pathlib import Path
from typing import NamedTuple

import pytest

import gcbackend as gc

README = Path(__file__).resolve().parent.parent / "README.md"


class Block(NamedTuple):
    section: str
    line: int
    code: str
    output: str | None


def _blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    section = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            language = line[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            body = "\n".join(lines[i + 1 : end]) + "\n"
            if language == "python":
                blocks.append(Block(section, i + 1, body, None))
                # An output block must follow right away (blank lines allowed).
                after = end + 1
                while after < len(lines) and not lines[after].strip():
                    after += 1
                if after < len(lines) and lines[after].strip() in ("```", "```text"):
                    out_end = next(j for j in range(after + 1, len(lines)) if lines[j].startswith("```"))
                    output = "\n".join(lines[after + 1 : out_end]) + "\n"
                    blocks[-1] = blocks[-1]._replace(output=output)
                    end = out_end
            i = end + 1
            continue
        i += 1
    return blocks


BLOCKS = _blocks(README.read_text(encoding="utf-8"))

# Blocks whose claim waits on another issue: (section, reason).
WAITING: dict[str, str] = {}


def _leading_literal(comment: str) -> object:
    """The Python literal a comment starts with, or a sentinel when it starts with none."""
    comment = comment.strip()
    if not comment or comment[0] not in "'\"([{-0123456789":
        return _NONE
    if comment[0] in "-0123456789":
        match = re.match(r"-?\d+(\.\d*)?(e-?\d+)?", comment)
        return ast.literal_eval(match.group(0)) if match else _NONE
    for end in range(1, len(comment) + 1):  # the shortest prefix that is a literal
        try:
            return ast.literal_eval(comment[:end])
        except (SyntaxError, ValueError):
            continue
    return _NONE


_NONE = object()


def _with_checks(code: str) -> str:
    """``code`` with each ``expression  # literal`` line turned into an assertion."""
    out = []
    for line in code.splitlines():
        statement, hash_, comment = line.partition("  #")
        expected = _leading_literal(comment) if hash_ else _NONE
        if expected is not _NONE:
            try:
                tree = ast.parse(statement.strip())
            except SyntaxError:
                tree = None
            if tree and len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr):
                indent = statement[: len(statement) - len(statement.lstrip())]
                out.append(
                    f"{indent}assert ({statement.strip()}) == {expected!r}, "
                    f"({statement.strip()!r}, {statement.strip()})"
                )
                continue
        out.append(line)
    return "\n".join(out) + "\n"


def _matches(actual: str, expected: str) -> bool:
    """Line by line; an expected line ``...`` (indented or not) matches any number of lines."""
    pattern = "".join(
        r"(?:.*\n)*?" if line.strip() == "..." else re.escape(line) + r"\n" for line in expected.splitlines()
    )
    return re.fullmatch(pattern, actual) is not None


def _needs(block: Block) -> str | None:
    """Why a block cannot run here, or None."""
    if "import cupy" in block.code:
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # no CuPy, or no usable device
            return f"needs CuPy and a CUDA device ({type(exc).__name__})"
    if "dask" in block.code:
        pytest.importorskip("dask.distributed")
    # The framework sections share one namespace: a block that uses torch (or jax) without
    # importing it relies on an earlier block that did.
    for library, label in (("torch", "PyTorch"), ("jax", "JAX")):
        if re.search(rf"\b{library}\.|import {library}\b", block.code):
            pytest.importorskip(
                library, reason=f"{label} is not installed (pip install 'gcbackend[{library}]')"
            )
    return None


def _runnable(block: Block) -> bool:
    """Whether an earlier block can run here: its skip must not skip the block being tested."""
    try:
        return _needs(block) is None
    except pytest.skip.Exception:
        return False


_NAMESPACE: dict = {"__name__": "__main__"}  # the Dask example runs its guarded part
_RAN: set[int] = set()


def _run(index: int) -> str:
    """Run block ``index`` (after the earlier ones, once each) and return what it printed."""
    for earlier in range(index):
        if earlier not in _RAN:
            _RAN.add(earlier)
            if _runnable(BLOCKS[earlier]):
                with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
                    exec(
                        compile(BLOCKS[earlier].code, f"README.md:{BLOCKS[earlier].line}", "exec"), _NAMESPACE
                    )
    _RAN.add(index)
    block = BLOCKS[index]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_with_checks(block.code), f"README.md:{block.line}", "exec"), _NAMESPACE)
        for name, value in list(_NAMESPACE.items()):  # "In your tests": run the test it defines
            if name.startswith("test_") and callable(value) and f"def {name}(" in block.code:
                value()
    return printed.getvalue()


def _params():
    for i, block in enumerate(BLOCKS):
        marks = []
        if block.section in WAITING:
            marks.append(pytest.mark.xfail(reason=WAITING[block.section], strict=True))
        yield pytest.param(i, id=f"{block.section}@{block.line}", marks=marks)


@pytest.fixture(scope="module", autouse=True)
def _jax_x64_restored():
    """The JAX example turns float64 on for the process; the tests after this module get
    JAX's setting back as it was."""
    try:
        import jax
    except ImportError:
        yield
        return
    before = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("index", list(_params()))
def test_readme_block(index, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    block = BLOCKS[index]
    reason = _needs(block)
    if reason:
        pytest.skip(reason)
    printed = _run(index)
    if block.output is not None:
        assert _matches(printed, block.output), f"README.md:{block.line} prints\n{printed}"


def test_every_python_block_is_collected():
    text = README.read_text(encoding="utf-8")
    assert len(BLOCKS) == text.count("```python\n") > 0
    assert any(b.output for b in BLOCKS)  # the Use example's report


def test_the_readme_states_checks_real_signature():
    text = README.read_text(encoding="utf-8")
    stated = re.search(r"`gc\.check\((cost, params, grads, \*args, .*?)\)`", text, re.S).group(1)
    stated = " ".join(stated.split())
    real = ", ".join(
        "*args"
        if p.kind is p.VAR_POSITIONAL
        else p.name
        if p.default is p.empty
        else f'{p.name}="{p.default}"'
        if isinstance(p.default, str)
        else f"{p.name}={p.default!r}"
        for p in inspect.signature(gc.check).parameters.values()
    )
    assert stated == real


def test_literal_comments_become_assertions():
    assert _with_checks("x.verdict  # 'fail'   (or 'pass')\n") == (
        "assert (x.verdict) == 'fail', ('x.verdict', x.verdict)\n"
    )
    assert _with_checks("x.faults  # ('b1', 'W2'), worst first\n").startswith(
        "assert (x.faults) == ('b1', 'W2')"
    )
    assert (
        _with_checks("x.parameters['W2']  # .difference (1/3)\n")
        == "x.parameters['W2']  # .difference (1/3)\n"
    )
    assert _with_checks("y = f(x)  # 'pass'\n") == "y = f(x)  # 'pass'\n"  # not an expression
    assert _matches("a\nb\nc\nd\n", "a\n...\nd\n") and not _matches("a\nb\n", "a\nc\n")

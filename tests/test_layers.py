"""The package's layers: imports go one way (down), and there is no import cycle.

Read from the source (every ``import``, also those inside functions), not by importing it.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxdiff"

# What each room may import from jaxdiff, lowest first. A room always may import itself.
ALLOWED = {
  "checks": set(),  # the config sections' shared field checks: NumPy only
  "config": set(),  # the schema and defaults: ml_collections only
  "core": set(),
  "models": {"config"},
  "parallel": set(),
  "io": set(),
  "sampling": {"config", "core", "parallel"},
  "data": {"parallel", "io"},
  "latent": {"config", "models", "parallel", "data", "io"},
  "text": {"models"},  # the pretrained text encoder: finds, reads and tokenizes
  "text_files": {"io"},  # precomputed caption embeddings: an encoder run elsewhere
  # a text run's captions and prompts, encoded
  "prompts": {"config", "models", "text", "text_files", "data", "io"},
  "evaluation": {"core", "models", "parallel", "sampling", "data", "io"},
  "training": {"config", "core", "models", "parallel", "sampling", "data", "io", "evaluation"}
  | {"latent", "prompts"},
  "run": {"config", "core", "models", "parallel", "sampling", "io", "training", "prompts"},
  "cli": {"config", "core", "models", "parallel", "sampling", "data", "io", "evaluation"}
  | {"latent", "training", "run", "prompts"},
  "__main__": {"cli"},  # python -m jaxdiff
}
for _room_name, _below in ALLOWED.items():  # checks is below every room
  if _room_name != "checks":
    _below.add("checks")
# core is the maths: no third-party package but these.
CORE_THIRD_PARTY = {"jax", "numpy", "flax"}


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str | None = None) -> set[str]:
  """Absolute names of every module ``path`` imports (``from a import b`` gives a and a.b)."""
  names = set()
  is_package = path.name == "__init__.py"
  here = (module or _module_name(path)).split(".")
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative
        anchor = here if is_package else here[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      names.add(base)
      names.update(f"{base}.{alias.name}" for alias in node.names)
  return names


def _modules() -> dict[str, set[str]]:
  mods = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
  return {m: {i for i in imps if i in mods and i != m} | {i for i in imps if i not in mods}
          for m, imps in mods.items()}  # fmt: skip


def _room(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None


def test_every_room_imports_only_the_rooms_below_it():
  mods = _modules()
  assert set(ALLOWED) >= {_room(m) for m in mods if _room(m)}, "a new room needs a layer"
  bad = []
  for module, imports in mods.items():
    room = _room(module)
    if room is None:  # jaxdiff/__init__.py: lazy re-exports only
      continue
    for target in imports:
      other = _room(target) if target.startswith("jaxdiff.") else room
      if other != room and other not in ALLOWED[room]:
        bad.append(f"{module} -> {target}")
  assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_core_uses_only_jax_numpy_and_flax():
  import sys

  for module, imports in _modules().items():
    if _room(module) != "core":
      continue
    third = {i.split(".")[0] for i in imports} - {"jaxdiff", "__future__"}
    third -= set(sys.stdlib_module_names)
    assert third <= CORE_THIRD_PARTY, f"{module} imports {third - CORE_THIRD_PARTY}"


def test_no_import_cycle():
  mods = _modules()
  graph = {m: {i for i in imps if i in mods} for m, imps in mods.items()}
  # A package's __init__ re-exporting its own modules is not a cycle of design: drop the edges
  # from a package to its children, keep everything else.
  graph = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in graph.items()}
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(m: str) -> None:
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_the_checker_sees_a_violation(tmp_path):
  # The checks above must be able to fail: an upward import is found in a parsed file.
  f = tmp_path / "x.py"
  f.write_text("def f():\n  from jaxdiff.training import loop\n")
  assert "jaxdiff.training.loop" in _imports(f, "jaxdiff.core.x")


MAX_FUNCTION_LINES = 60  # of code: the docstring does not count
# A function may be longer when a comment on the line above its `def` (or its decorators)
# starts with this and says why, e.g. a model constructor that lists its layers.
LONG_MARK = "# Long:"


def _long_functions(path: Path, name: str | None = None) -> list[str]:
  lines = path.read_text().splitlines()
  name = name or str(path.relative_to(PACKAGE.parent))
  found = []
  for node in ast.walk(ast.parse("\n".join(lines))):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
      length = node.end_lineno - node.lineno + 1
      doc = node.body[0]
      if isinstance(doc, ast.Expr) and isinstance(getattr(doc, "value", None), ast.Constant):
        length -= doc.end_lineno - doc.lineno + 1
      if length > MAX_FUNCTION_LINES and not lines[first - 2].strip().startswith(LONG_MARK):
        found.append(f"{name}:{node.lineno} {node.name} ({length})")
  return found


def test_functions_are_short_unless_a_comment_says_why():
  long = [f for p in sorted(PACKAGE.rglob("*.py")) for f in _long_functions(p)]
  assert not long, (
    f"functions over {MAX_FUNCTION_LINES} lines without a '{LONG_MARK}' comment:\n"
    + "\n".join(long)
  )


def test_the_length_check_can_fail(tmp_path):
  body = "\n".join(f"  x{i} = {i}" for i in range(70))
  f = tmp_path / "m.py"
  f.write_text(f"def f():\n{body}\n")
  assert _long_functions(f, "m.py") == ["m.py:1 f (71)"]
  f.write_text(f"{LONG_MARK} a table of seventy constants.\ndef f():\n{body}\n")
  assert _long_functions(f, "m.py") == []

"""The library's module-level imports (TYPE_CHECKING blocks included) form a tree: no module reaches
itself again, so any module imports first and a type checker sees no circle."""

import ast
from pathlib import Path

import visionzip

PACKAGE = Path(visionzip.__file__).parent


def module_name(path: Path) -> str:
    parts = ("visionzip", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules of the package `path` imports outside functions (an `if TYPE_CHECKING:` block counts)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    nodes = list(ast.parse(path.read_text()).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If | ast.Try):
            nodes.extend(node.body + node.orelse + getattr(node, "finalbody", []))
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x` names a module
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("visionzip"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("visionzip"))
    return found


def test_library_imports_form_a_tree():
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {
        name: {target for target in top_level_imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for target in graph[node]:
                if target == start:
                    return [*trail, start]
                if target not in trail:
                    stack.append((target, [*trail, target]))
        return None

    circles = [cycle for name in sorted(graph) if (cycle := cycle_from(name))]
    assert not circles, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in circles[:5])

"""No folder of the package holds an import cycle: within each package, its modules and
sub-packages (each taken whole) import one another in one direction only, so that each can be
read, tested and replaced from the bottom up. `lint-imports` (the test command) checks the named
layers; this checks every folder. Imports made only for type checking are left out: they cost
nothing at run time and name the types of the layer above (a route handler's `Gateway`)."""

from __future__ import annotations

import grimp


def _cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """The groups of `package`'s children that import one another in a ring (Tarjan's
    strongly connected components, those of more than one)."""
    children = sorted(graph.find_children(package))
    imports = {
        a: [
            b
            for b in children
            if b != a and graph.direct_import_exists(importer=a, imported=b, as_packages=True)
        ]
        for a in children
    }
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    rings: list[list[str]] = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for other in imports[module]:
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            ring = []
            while True:
                member = stack.pop()
                ring.append(member)
                if member == module:
                    break
            if len(ring) > 1:
                rings.append(sorted(ring))

    for child in children:
        if child not in order:
            visit(child)
    return rings


def test_no_folder_holds_an_import_cycle() -> None:
    graph = grimp.build_graph("parallama", exclude_type_checking_imports=True)
    packages = sorted(m for m in graph.modules if graph.find_children(m))
    found = {package: rings for package in packages if (rings := _cycles(graph, package))}
    assert not found, f"import cycles, by folder: {found}"

"""llama-cpp-python's server, able to load models without weight repacking:
`python -m parallama.launch.llama_cpp_engine [--no-repack] <python -m llama_cpp.server's args>`.

llama.cpp repacks a model's weights into the CPU's "extra buffer types" (AMX tiles and others)
unless the model parameter `use_extra_bufts` is false. Built natively on an Intel CPU with AMX,
llama-cpp-python crashes (SIGSEGV) in those buffers on any prompt longer than one token, and its
server has no option to turn them off. `llama_cpp.Llama` takes its model parameters from
`llama_cpp.llama_cpp.llama_model_default_params()`, looked up on that module at each load, so
`--no-repack` wraps that function before the server starts; everything else is the server's own
`main`, run as `python -m llama_cpp.server` runs it.
"""

from __future__ import annotations

import runpy
import sys

NO_REPACK = "--no-repack"


def main(argv: list[str]) -> None:
    """Run llama_cpp.server with `argv` (its own arguments after ours)."""
    repack = NO_REPACK not in argv[:1]
    if not repack:
        without_repacking()
    sys.argv = [sys.argv[0], *argv[0 if repack else 1 :]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


def without_repacking() -> None:
    """Make every model load with `use_extra_bufts = false`; an older llama-cpp-python whose
    llama.cpp has no such parameter is said so on stderr (in the instance's log) and used as is."""
    import llama_cpp.llama_cpp as bindings

    fields = [name for name, *_ in bindings.llama_model_params._fields_]
    if "use_extra_bufts" not in fields:
        print(
            f"parallama: {NO_REPACK} ignored: this llama-cpp-python has no use_extra_bufts",
            file=sys.stderr,
            flush=True,
        )
        return
    defaults = bindings.llama_model_default_params

    def model_params_without_repacking() -> bindings.llama_model_params:
        params: bindings.llama_model_params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = model_params_without_repacking


if __name__ == "__main__":
    main(sys.argv[1:])

"""mtcore's Triton kernels, one op a file. Installed as `mtcore.kernels`, never as top-level `kernels`.

Each op runs Triton on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1), and a torch
implementation of the same algorithm on CPU tensors otherwise. Each has a plain-torch `*_ref`.
"""

if __name__ == "kernels":
    # Imported as a top-level `kernels`: a clone's root is on sys.path (`python -m pytest`, `python -m mtcore`
    # run there), where this folder shadows Hugging Face's `kernels`. That package must keep the name:
    # - installed (transformers 5.25 depends on it and imports it while loading a checkpoint): this file
    #   hands the name over to it, found on the rest of sys.path;
    # - absent (the GPU image's transformers 5.17): this module reads as absent, as a namespace package
    #   does, with no __file__, no __version__ and nothing to import beneath it. transformers 5.17 finds
    #   the name, imports it to read a version, and takes such a module for "not installed". Raising
    #   ModuleNotFoundError instead escaped its lazy imports: `from transformers import LlamaForCausalLM`
    #   failed. The folder stays a regular package because setuptools' editable installs map
    #   `mtcore.kernels` to it only through an __init__.py.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.realpath(p or os.curdir) != _root])  # links too
    if _spec is None:
        del globals()["__file__"]
        __path__ = []
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this file ran
        _spec.loader.exec_module(_module)
else:
    from mtcore.kernels.bt_loss import BTOutput, bt_loss, bt_loss_ref
    from mtcore.kernels.dpo_loss import DPOOutput, dpo_loss, dpo_loss_ref
    from mtcore.kernels.fused_logprobs import fused_logprobs, fused_logprobs_ref, sequence_logps

    __all__ = ["BTOutput", "DPOOutput", "bt_loss", "bt_loss_ref", "dpo_loss", "dpo_loss_ref", "fused_logprobs",
               "fused_logprobs_ref", "sequence_logps"]

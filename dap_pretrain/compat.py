"""Compatibility with the packages around the mm stack, for both mm front ends (``dap_pretrain.mm`` and
``downstream``); it imports nothing from them until called, so ``import dap_pretrain`` still needs none.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

# What mmpretrain's multimodal models (BLIP's language model) import from transformers, in mmpretrain 1.2.0.
_MULTIMODAL_NEEDS = ("PreTrainedModel", "apply_chunking_to_forward", "find_pruneable_heads_and_indices",
                     "prune_linear_layer")  # fmt: skip


def quiet_mm_imports() -> None:
    """Hides the one warning every mm command printed before its first line of output: mmengine 0.10.7 imports
    ``pkg_resources``, which setuptools>=67 (the install pins <81, which still has it) reports as deprecated, twice.
    A refusal then read as five lines instead of one. Only that message is filtered."""
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated as an API", category=UserWarning)


def without_broken_multimodal() -> str | None:
    """Switches off mmpretrain's multimodal models where the installed transformers cannot serve them.

    mmpretrain 1.2.0 imports its multimodal models (BLIP, CLIP, ...) whenever ``transformers>=4.28`` is installed,
    and BLIP needs ``transformers.modeling_utils`` names that newer transformers no longer has. Its import then
    fails with "NoneType takes no arguments", and so does every mmdet model build (mmdet imports mmpretrain) and
    the mmpretrain front end. Neither DaP's classifier nor the transfers use those models, so when the names are
    missing, mmpretrain is told what it does without transformers: register placeholders instead.

    Call before anything imports ``mmpretrain.models``. Returns a one-line notice when it switched them off, else
    ``None`` (mmpretrain absent, transformers absent or compatible, or the models already imported).
    """
    if importlib.util.find_spec("mmpretrain") is None or "mmpretrain.models" in sys.modules:
        return None
    from mmpretrain.utils import dependency

    if not dependency.WITH_MULTIMODAL:
        return None
    try:
        import transformers.modeling_utils as hf

        missing = [name for name in _MULTIMODAL_NEEDS if not hasattr(hf, name)]
        version = getattr(sys.modules.get("transformers"), "__version__", "?")
    except Exception as e:  # noqa: BLE001  (a transformers that fails to import at all breaks mmpretrain the same way)
        missing, version = [f"import failed: {type(e).__name__}: {e}"], "?"
    if not missing:
        return None
    dependency.WITH_MULTIMODAL = False
    return (
        f"mmpretrain's multimodal models switched off: transformers {version} lacks what they import "
        f"({', '.join(missing)}); DaP and the transfers do not use them"
    )

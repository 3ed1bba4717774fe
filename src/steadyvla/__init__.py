"""steadyvla: crash-proof, bit-exact resumable fine-tuning and training of OpenVLA-style VLAs."""

__version__ = "0.1.0"

# Public API, imported lazily so that `import steadyvla` (and every CLI verb) stays cheap.
_EXPORTS = {
    "load_vla": "steadyvla.model.bundle",
    "VLABundle": "steadyvla.model.bundle",
    "predict_action": "steadyvla.predict",
    "save_vla": "steadyvla.model.bundle",
    "write_openvla_dir": "steadyvla.model.openvla_save",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'steadyvla' has no attribute {name!r}")

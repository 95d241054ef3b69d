from kvsim.specs.hardware import HardwareSpec, load_hardware
from kvsim.specs.model import ModelSpec, load_model

__all__ = ["ModelSpec", "HardwareSpec", "load_model", "load_hardware"]

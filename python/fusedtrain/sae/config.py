"""`SAEConfig`: the hyperparameters of a `SparseAutoencoder`, the one list that saving and loading use.

The fields are the constructor's keyword arguments under the same names (the module keeps each as
an attribute of that name), minus those that say where the module lives rather than what it is
(`RUNTIME_ARGUMENTS`). A new constructor argument needs a field here: `from_module` refuses to save a
module whose constructor has an argument this class does not know, so nothing is silently dropped.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class SAEConfig:
    """What `SparseAutoencoder(**config.to_kwargs())` is built from (meanings: the constructor)."""
    d_in: int
    num_latents: int
    routing: str = "topk"
    k: int = 32
    m: int | None = None
    k_aux: int | None = None
    auxk_alpha: float = 1 / 32
    dead_tokens_threshold: int | float = 10_000_000
    threshold_decay: float = 0.99
    use_threshold: bool = True

    # Constructor arguments that are not hyperparameters: not saved, given again when loading.
    RUNTIME_ARGUMENTS: ClassVar[tuple[str, ...]] = ("device", "dtype", "process_group", "data_parallel_group")
    # Constructor arguments the module keeps in a buffer, saved with the buffers: threshold routing's
    # `theta` is the `threshold` buffer (the loader gives a placeholder, then loads the buffer).
    STATE_ARGUMENTS: ClassVar[tuple[str, ...]] = ("theta",)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_module(cls, sae) -> "SAEConfig":
        """The hyperparameters of a built module (its attributes of the fields' names)."""
        constructor = inspect.signature(type(sae).__init__).parameters
        unknown = [name for name, p in constructor.items()
                   if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   and name not in cls.field_names() and name not in cls.RUNTIME_ARGUMENTS + cls.STATE_ARGUMENTS]
        if unknown:
            raise TypeError(f"{type(sae).__name__}'s constructor takes {unknown}, which SAEConfig does not record: "
                            f"add them as fields of SAEConfig (fusedtrain/sae/config.py) so they are saved")
        missing = [name for name in cls.field_names() if not hasattr(sae, name)]
        if missing:
            raise TypeError(f"{type(sae).__name__} keeps no attribute {missing}: SAEConfig reads each hyperparameter "
                            f"from the module attribute of the same name")
        return cls(**{name: getattr(sae, name) for name in cls.field_names()})

    def to_kwargs(self) -> dict:
        """The constructor's keyword arguments."""
        return {name: getattr(self, name) for name in self.field_names()}

    def to_dict(self) -> dict:
        """A JSON-ready dict (plain ints, floats, strings, bools and None)."""
        return self.to_kwargs()

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "SAEConfig":
        """From `to_dict`'s output; unknown keys raise (a newer fusedtrain wrote them), missing
        optional keys take their defaults (an older one did)."""
        if not isinstance(values, dict):
            raise TypeError(f"{source} must be a dict of SAE hyperparameters, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{source} has unknown SAE hyperparameters {unknown} (written by a newer fusedtrain?); "
                             f"known: {list(cls.field_names())}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in values and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{source} lacks the SAE hyperparameters {missing}")
        return cls(**values)

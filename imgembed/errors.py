"""Typed errors. Every user-facing failure is an ``ImgembedError`` subclass whose message names the
offending file/value and what was expected, so callers can catch precisely and users can act."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # parity imports this module
    from imgembed.gate.parity import ParityReport


class ImgembedError(Exception):
    """Base class of every error imgembed raises on purpose."""


class RegistryError(ImgembedError):
    """models.yaml (or a user registry) is malformed."""


class UnknownModelError(ImgembedError, KeyError):
    """A model name is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ImageDecodeError(ImgembedError, ValueError):
    """An input could not be turned into an RGB image (corrupt, truncated, unsupported, too large)."""


class ArtifactError(ImgembedError):
    """An artifact directory is missing, malformed or was written by an incompatible version."""


class IntegrityError(ArtifactError):
    """An artifact file does not match the sha256 recorded in its manifest."""


class SignatureError(ArtifactError):
    """An artifact's signature is missing, does not verify with the given public key, or cannot be made
    (including: the ``sign`` extra is not installed)."""


class ExportError(ImgembedError):
    """Export to ONNX (or an optimization step) failed."""


class ParityError(ExportError):
    """The exported artifact does not match the PyTorch original within the tolerances."""

    def __init__(self, message: str, report: ParityReport | None = None):
        super().__init__(message)
        self.report = report


class BackendUnavailableError(ImgembedError):
    """A runtime backend (library or device) is not available on this machine."""


class EngineMismatchError(ArtifactError):
    """A TensorRT engine was built for another GPU model or TensorRT version than this machine's."""


class WeightsError(ImgembedError):
    """Model weights could not be loaded (missing directory, bad config, network unavailable...)."""


class CheckpointPreprocessError(WeightsError):
    """A checkpoint's preprocessor_config.json asks for a setting imgembed cannot reproduce; ``key`` names it."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class ImageSetError(ImgembedError, ValueError):
    """A directory of user images (``parity --images DIR``) is missing or holds no readable image."""

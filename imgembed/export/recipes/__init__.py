"""Engine recipes as data: every way an export can build an engine is a registered :class:`Recipe`, and the
candidate plan of an export (:func:`plan`) is computed from the registry. A new recipe is one module here that
defines its builder and registers its record (every module of the package is imported with it); tests and
callers refer to recipes by record (``recipes.ORT_INT8_SMOOTHQUANT.id``), never by a copied id string.

Modules, by what they build: :mod:`.onnxruntime` (float graphs, INT8 presets and their 7-bit portable twins),
:mod:`.smoothquant`, :mod:`.cle`, :mod:`.rounded`, :mod:`.mixed` (ONNX Runtime recipes for outliers and
trained CNN weights), :mod:`.openvino` (IR and NNCF),
:mod:`.tensorrt` (plans for this GPU, device ``cuda``: planned only when GPU engines are asked for).
"""
import importlib
import pkgutil

from imgembed.export.engines import LAST_RESORT
from imgembed.export.recipes.cle import ORT_INT8_CLE, ORT_INT8_CLE_7BIT
from imgembed.export.recipes.mixed import ORT_INT8_MIXED
from imgembed.export.recipes.onnxruntime import (
    ORT_FP16,
    ORT_FP32,
    ORT_INT8_FORCED_ONLY,
    ORT_INT8_STATIC_QDQ,
    ORT_INT8_STATIC_QDQ_MATMUL,
    ORT_INT8_STATIC_QDQ_MATMUL_7BIT,
    ORT_INT8_STATIC_QOPERATOR,
    ORT_INT8_STATIC_QOPERATOR_7BIT,
)
from imgembed.export.recipes.openvino import (
    OV_BF16,
    OV_FP32,
    OV_INT8,
    OV_INT8_BF16,
    OV_INT8_CLE,
    OV_INT8_CLE_BF16,
    OV_INT8_SMOOTHQUANT,
    OV_INT8_SMOOTHQUANT_BF16,
)
from imgembed.export.recipes.registry import (
    KINDS,
    Recipe,
    always,
    get,
    kind_of,
    never,
    plan,
    presets,
    recipes,
    register,
    registered,
    unregister,
    with_vnni,
    without_vnni,
)
from imgembed.export.recipes.rounded import ORT_INT8_ROUNDED
from imgembed.export.recipes.smoothquant import ORT_INT8_SMOOTHQUANT, ORT_INT8_SMOOTHQUANT_7BIT
from imgembed.export.recipes.tensorrt import TRT_FP16, TRT_FP32, TRT_INT8

# every module of this package registers its records when imported: a new recipe module needs no import here
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "KINDS", "LAST_RESORT", "Recipe", "always", "get", "kind_of", "never", "plan", "presets", "recipes", "register",
    "registered", "unregister", "with_vnni", "without_vnni",
    "ORT_FP16", "ORT_FP32", "ORT_INT8_FORCED_ONLY", "ORT_INT8_STATIC_QDQ", "ORT_INT8_STATIC_QDQ_MATMUL",
    "ORT_INT8_STATIC_QDQ_MATMUL_7BIT", "ORT_INT8_STATIC_QOPERATOR", "ORT_INT8_STATIC_QOPERATOR_7BIT",
    "ORT_INT8_SMOOTHQUANT", "ORT_INT8_SMOOTHQUANT_7BIT", "ORT_INT8_CLE", "ORT_INT8_CLE_7BIT", "ORT_INT8_MIXED",
    "ORT_INT8_ROUNDED",
    "OV_BF16", "OV_FP32", "OV_INT8", "OV_INT8_BF16", "OV_INT8_CLE", "OV_INT8_CLE_BF16", "OV_INT8_SMOOTHQUANT",
    "OV_INT8_SMOOTHQUANT_BF16", "TRT_FP32", "TRT_FP16", "TRT_INT8",
]

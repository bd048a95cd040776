"""The TensorRT IPluginV3 wrapper, loaded into a real TensorRT plugin registry (tensorrt-lean).

TensorRT's C++ headers are in no package registry, so these tests are not part of the default
run: point TENSORRT_ROOT (or TENSORRT_INCLUDE) at a copy (e.g. NVIDIA/TensorRT's include/),
`pip install -e '.[trt]'`, then `pytest -m tensorrt`. The lean runtime's registry works without
a GPU; no TensorRT engine is built here.
"""
from __future__ import annotations

import numpy as np
import pytest

from builder.convert.plugins import TRT_PLUGIN, compile_plugins, find_nvcc, find_tensorrt_include

pytestmark = pytest.mark.tensorrt

FIELDS = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "image_start": 35, "image_len": 2880, "keep": 1440}


@pytest.fixture(scope="module")
def trt():
    """Imported here, so that a default run (which deselects this module) never needs it."""
    try:
        import tensorrt_lean
    except ImportError:
        pytest.fail("`pytest -m tensorrt` needs tensorrt-lean: pip install -e '.[trt]'", pytrace=False)
    if find_nvcc() is None or find_tensorrt_include() is None:
        pytest.fail("`pytest -m tensorrt` needs nvcc and TensorRT headers (set TENSORRT_ROOT)", pytrace=False)
    return tensorrt_lean


def collection(trt, fields: dict):
    return trt.PluginFieldCollection([trt.PluginField(k, np.array([v], dtype=np.int32), trt.PluginFieldType.INT32)
                                      for k, v in fields.items()])


@pytest.fixture(scope="module")
def creator(trt, tmp_path_factory):
    library = compile_plugins(["90"], cache=tmp_path_factory.mktemp("cache"), progress=False,
                              tensorrt=find_tensorrt_include())
    registry = trt.get_plugin_registry()
    assert registry.load_library(str(library)) is not None
    return registry.get_creator(TRT_PLUGIN["name"], TRT_PLUGIN["version"], TRT_PLUGIN["namespace"])


def test_creator_is_registered_with_its_fields(creator):
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == ("PdropRankCompact", "1", "pdrop")
    assert [f.name for f in creator.field_names] == list(FIELDS)


def test_plugin_is_created_and_describes_itself(trt, creator):
    plugin = creator.create_plugin("rank", collection(trt, FIELDS), trt.TensorRTPhase.BUILD)
    core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    assert (core.plugin_name, core.plugin_version, core.plugin_namespace) == ("PdropRankCompact", "1", "pdrop")
    assert plugin.get_capability_interface(trt.PluginCapabilityType.BUILD).num_outputs == 1


@pytest.mark.parametrize("bad", [{"keep": 3000}, {"num_kv_heads": 5}, {"head_dim": 0}])
def test_inconsistent_or_missing_fields_are_refused(trt, creator, bad):
    assert creator.create_plugin("rank", collection(trt, {**FIELDS, **bad}), trt.TensorRTPhase.BUILD) is None
    partial = {k: v for k, v in FIELDS.items() if k != "keep"}
    assert creator.create_plugin("rank", collection(trt, partial), trt.TensorRTPhase.BUILD) is None

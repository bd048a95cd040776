"""The TensorRT IPluginV3 wrapper, loaded into a real TensorRT plugin registry (tensorrt-lean).

TensorRT's C++ headers are in no package registry: point TENSORRT_ROOT (or TENSORRT_INCLUDE) at
a copy (e.g. NVIDIA/TensorRT's include/) and `pip install tensorrt-lean-cu13` to run this. The
lean runtime's registry works without a GPU; building a TensorRT engine does not happen here.
"""
from __future__ import annotations

import numpy as np
import pytest

from builder.plugin_build import TRT_PLUGIN, compile_plugins, find_nvcc, find_tensorrt_include

trt = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean runtime not installed")
pytestmark = pytest.mark.skipif(find_nvcc() is None or find_tensorrt_include() is None,
                                reason="nvcc or TensorRT headers (TENSORRT_ROOT) not available")

FIELDS = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "image_start": 35, "image_len": 2880, "keep": 1440}


def collection(fields: dict):
    return trt.PluginFieldCollection([trt.PluginField(k, np.array([v], dtype=np.int32), trt.PluginFieldType.INT32)
                                      for k, v in fields.items()])


@pytest.fixture(scope="module")
def creator(tmp_path_factory):
    library = compile_plugins(["90"], cache=tmp_path_factory.mktemp("cache"), progress=False,
                              tensorrt=find_tensorrt_include())
    registry = trt.get_plugin_registry()
    assert registry.load_library(str(library)) is not None
    return registry.get_creator(TRT_PLUGIN["name"], TRT_PLUGIN["version"], TRT_PLUGIN["namespace"])


def test_creator_is_registered_with_its_fields(creator):
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == ("PdropRankCompact", "1", "pdrop")
    assert [f.name for f in creator.field_names] == list(FIELDS)


def test_plugin_is_created_and_describes_itself(creator):
    plugin = creator.create_plugin("rank", collection(FIELDS), trt.TensorRTPhase.BUILD)
    core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    assert (core.plugin_name, core.plugin_version, core.plugin_namespace) == ("PdropRankCompact", "1", "pdrop")
    assert plugin.get_capability_interface(trt.PluginCapabilityType.BUILD).num_outputs == 1


@pytest.mark.parametrize("bad", [{"keep": 3000}, {"num_kv_heads": 5}, {"head_dim": 0}])
def test_inconsistent_or_missing_fields_are_refused(creator, bad):
    assert creator.create_plugin("rank", collection({**FIELDS, **bad}), trt.TensorRTPhase.BUILD) is None
    partial = {k: v for k, v in FIELDS.items() if k != "keep"}
    assert creator.create_plugin("rank", collection(partial), trt.TensorRTPhase.BUILD) is None

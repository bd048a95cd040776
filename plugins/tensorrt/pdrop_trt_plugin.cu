// TensorRT IPluginV3 around the PyramidDrop kernels: "PdropRankCompact" version "1" in namespace
// "pdrop". One stage boundary of one sequence: rank the image span by the last token's attention
// and drop all but `keep` image rows of the hidden states.
//
//   inputs   hidden [L, dim], q [num_heads, head_dim] (the last token's RoPE'd query of the
//            boundary layer), k [L, num_kv_heads, head_dim] (RoPE'd keys); one dtype: f32/f16/bf16
//   output   hidden' [L - image_len + keep, dim]
//   fields   num_heads, num_kv_heads, head_dim, image_start, image_len, keep (INT32)
//
// The image span is a build-time field, so output shapes stay static (a fixed prompt layout and
// image resolution per engine, as TensorRT multimodal deployments use). Built only where the
// TensorRT headers are found; registered through getCreators() for IPluginRegistry::loadLibrary.
// enqueue reads no host memory (the small index arrays are written by a kernel from its arguments),
// so it never blocks the host and can be captured in a CUDA graph.
#include "NvInferRuntime.h"
#include "pdrop_plugins.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

// A named namespace for the kernel: nvcc's launch stub names its namespace, and an unnamed one is
// ambiguous here (NvInferRuntime.h opens one inside nvinfer1, which the using-directive brings in).
namespace pdrop_trt {

// The one sequence's offsets and image span, where the kernels read them: on the device.
struct SmallArrays {
  int64_t i64[8];  // seq offsets, image offsets, keep offsets, dst offsets (two each)
  int32_t i32[4];  // image start, image length, keep, padding
};

// `values` travels as a kernel argument, copied at launch (and into a captured graph) like any
// other: unlike a cudaMemcpyAsync from the host stack, nothing reads host memory after enqueue.
__global__ void write_small_arrays(SmallArrays values, SmallArrays* out) { *out = values; }

}  // namespace pdrop_trt

namespace {

using pdrop_trt::SmallArrays;

constexpr char const* kName = "PdropRankCompact";
constexpr char const* kVersion = "1";
constexpr char const* kNamespace = "pdrop";
constexpr char const* kFields[] = {"num_heads", "num_kv_heads", "head_dim", "image_start", "image_len", "keep"};
constexpr int kNbFields = 6;

struct Params {
  int32_t num_heads{0}, num_kv_heads{0}, head_dim{0}, image_start{0}, image_len{0}, keep{0};
  int32_t* at(int i) { return &num_heads + i; }
  bool valid() const {
    return num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0 && head_dim > 0 && image_start >= 0 &&
           image_len >= 0 && keep >= 0 && keep <= image_len;
  }
};

int dtype_of(DataType t) {
  return t == DataType::kFLOAT ? PDROP_FLOAT32 : t == DataType::kHALF ? PDROP_FLOAT16 : PDROP_BFLOAT16;
}

size_t align(size_t n) { return (n + 255) & ~size_t{255}; }

// Workspace: the score kernel's scratch, the scores, the kept indices, then the small index arrays.
struct Layout {
  size_t score_ws, scores, kept, small, total;
  Layout(Params const& p, int64_t max_len) {
    score_ws = align(pdrop_score_workspace_size(1, p.num_heads, static_cast<int>(max_len), p.image_len));
    scores = align(sizeof(float) * (p.image_len + 1));
    kept = align(sizeof(int32_t) * (p.keep + 1));
    small = align(sizeof(SmallArrays));
    total = score_ws + scores + kept + small;
  }
};

class PdropPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  explicit PdropPlugin(Params p) : mP(p) { initFields(); }
  PdropPlugin(PdropPlugin const& o) : mP(o.mP) { initFields(); }

  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    if (type == PluginCapabilityType::kBUILD) return static_cast<IPluginV3OneBuild*>(this);
    if (type == PluginCapabilityType::kRUNTIME) return static_cast<IPluginV3OneRuntime*>(this);
    return static_cast<IPluginV3OneCore*>(this);
  }
  IPluginV3* clone() noexcept override { return new (std::nothrow) PdropPlugin(*this); }

  char const* getPluginName() const noexcept override { return kName; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }

  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
                          int32_t) noexcept override {
    return 0;
  }
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
    auto const& d = io[pos].desc;
    if (d.format != PluginFormat::kLINEAR) return false;
    if (pos == 0) return d.type == DataType::kFLOAT || d.type == DataType::kHALF || d.type == DataType::kBF16;
    return d.type == io[0].desc.type;
  }
  int32_t getOutputDataTypes(DataType* out, int32_t, DataType const* in, int32_t) const noexcept override {
    out[0] = in[0];
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
                          IExprBuilder& expr) noexcept override {
    if (nbInputs != 3 || in[0].nbDims != 2 || in[1].nbDims != 2 || in[2].nbDims != 3) return -1;
    out[0].nbDims = 2;
    out[0].d[0] = expr.operation(DimensionOperation::kSUB, *in[0].d[0], *expr.constant(mP.image_len - mP.keep));
    out[0].d[1] = in[0].d[1];
    return 0;
  }
  size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    return Layout(mP, in[0].max.d[0]).total;
  }

  int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override {
    return 0;
  }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mFC; }

  int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const*, void const* const* in, void* const* out,
                  void* workspace, cudaStream_t stream) noexcept override {
    int64_t const len = inDesc[0].dims.d[0], dim = inDesc[0].dims.d[1];
    if (mP.image_start + mP.image_len > len) return PDROP_ERROR_INVALID_ARGUMENT;
    Layout const lay(mP, len);
    char* ws = static_cast<char*>(workspace);
    auto* scores = reinterpret_cast<float*>(ws + lay.score_ws);
    auto* kept = reinterpret_cast<int32_t*>(ws + lay.score_ws + lay.scores);
    auto* small = reinterpret_cast<SmallArrays*>(ws + lay.score_ws + lay.scores + lay.kept);
    int64_t const out_len = len - mP.image_len + mP.keep;
    SmallArrays const values{{0, len, 0, mP.image_len, 0, mP.keep, 0, out_len},
                             {mP.image_start, mP.image_len, mP.keep, 0}};
    pdrop_trt::write_small_arrays<<<1, 1, 0, stream>>>(values, small);
    if (cudaGetLastError() != cudaSuccess) return PDROP_ERROR_CUDA;
    int64_t const* i64 = small->i64;  // device addresses, never read here
    int32_t const* i32 = small->i32;
    int status = pdrop_score(in[1], in[2], i64, i32, i32 + 1, i64 + 2, 1, mP.num_heads, mP.num_kv_heads, mP.head_dim,
                             static_cast<int>(len), mP.image_len, 1.0f / std::sqrt(static_cast<float>(mP.head_dim)),
                             dtype_of(inDesc[0].type), scores, ws, stream);
    if (status == PDROP_SUCCESS) status = pdrop_select(scores, i64 + 2, i32 + 1, i32 + 2, i64 + 4, 1, kept, stream);
    if (status == PDROP_SUCCESS) {
      int64_t const row_bytes = dim * (inDesc[0].type == DataType::kFLOAT ? 4 : 2);
      status = pdrop_compact(in[0], i64, i32, i32 + 1, kept, i64 + 4, i64 + 6, 1, out_len, row_bytes, out[0], stream);
    }
    return status;
  }

 private:
  void initFields() {
    mFields.clear();
    for (int i = 0; i < kNbFields; ++i) mFields.emplace_back(kFields[i], mP.at(i), PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mFields.size());
    mFC.fields = mFields.data();
  }

  Params mP;
  std::vector<PluginField> mFields;
  PluginFieldCollection mFC{};
};

class PdropPluginCreator : public IPluginCreatorV3One {
 public:
  PdropPluginCreator() {
    for (int i = 0; i < kNbFields; ++i) mFields.emplace_back(kFields[i], nullptr, PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mFields.size());
    mFC.fields = mFields.data();
  }
  char const* getPluginName() const noexcept override { return kName; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &mFC; }

  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    Params p;
    int seen = 0;
    for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
      for (int j = 0; j < kNbFields; ++j) {
        if (std::strcmp(fc->fields[i].name, kFields[j]) == 0 && fc->fields[i].type == PluginFieldType::kINT32 &&
            fc->fields[i].data) {
          *p.at(j) = *static_cast<int32_t const*>(fc->fields[i].data);
          seen |= 1 << j;
        }
      }
    }
    if (seen != (1 << kNbFields) - 1 || !p.valid()) return nullptr;
    return new (std::nothrow) PdropPlugin(p);
  }

 private:
  std::vector<PluginField> mFields;
  PluginFieldCollection mFC{};
};

}  // namespace

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static PdropPluginCreator creator;
  static IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}

extern "C" void setLoggerFinder(ILoggerFinder*) {}

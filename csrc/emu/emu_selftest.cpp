// emu_selftest: a standalone driver of the CUDA kernels under the CPU emulator, built by
// tests/test_cuda_emu.py with and without -fsanitize=thread.
//
//   emu_selftest kernels   runs the forward, backward and fused kernels on a few rows of every dtype (fp32,
//                          bf16, fp16; several warps, a ragged V, unaligned rows, inplace) against a
//                          double-precision computation, and checks the emulator itself (shuffles, shared
//                          memory, divergent-barrier and deadlock reports). Prints "ok" and exits 0.
//   emu_selftest race      a kernel with a deliberately missing __syncthreads(): under ThreadSanitizer
//                          (halt_on_error=1) it must be reported (the test asserts that it is), which shows
//                          the sanitizer build sees the races that a missing barrier creates.
//   emu_selftest cluster_race       a cluster kernel that reads a peer block's shared memory with no
//                                   cluster barrier after the peer's write: must be reported likewise.
//   emu_selftest cluster_exit_race  a cluster kernel that reads a peer's shared memory while the peer may
//                                   have exited (no cluster barrier before exit): must be reported likewise.
// The kernels mode also runs the fused kernel with every cluster size (1 = the 3-pass kernel, 2, 4, 8) and
// checks the emulated clusters (ranks, map_shared_rank, barriers, divergent / missing cluster barriers).
#include "cuda_emu.h"

#include "../cuda/grpo_cuda.cu"

#include <math.h>
#include <stdio.h>

#include <random>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what, double got = 0, double want = 0) {
  if (!ok) {
    ++failures;
    fprintf(stderr, "FAIL: %s (got %.9g, want %.9g)\n", what, got, want);
  }
}

// ---- emulator checks ---------------------------------------------------------------------------------
__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  int v = lane + 100 * (threadIdx.x >> 5);
  int sum = v;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const int down = __shfl_down_sync(0xffffffffu, v, 3);
  const int bcast = __shfl_sync(0xffffffffu, v, 5);
  GK_SHARED(sh, int, 64);
  sh[threadIdx.x] = sum;
  __syncthreads();
  out[blockIdx.x * 256 + threadIdx.x] = sh[(threadIdx.x + 1) % blockDim.x];
  out[blockIdx.x * 256 + 64 + threadIdx.x] = down;
  out[blockIdx.x * 256 + 128 + threadIdx.x] = bcast;
}

__global__ void divergent_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void early_return_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void fresh_shared_kernel(float* out) {
  GK_SHARED(sh, float, 4);
  if (blockIdx.x == 0 && threadIdx.x == 0) sh[0] = 1.f;  // block 1 must not see block 0's value
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = sh[0];
}

// ---- clusters ----------------------------------------------------------------------------------------
__global__ void cluster_kernel(int* out) {
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  GK_SHARED(sh, int, 64);
  GK_DYN_SHARED(dyn, int);
  const int r = int(cluster.block_rank()), C = int(cluster.num_blocks());
  sh[threadIdx.x] = 1000 * int(blockIdx.x) + int(threadIdx.x);
  dyn[threadIdx.x] = r;
  cluster.sync();
  const int* peer = cluster.map_shared_rank(sh, (r + 1) % C);
  const int* peer_dyn = cluster.map_shared_rank(dyn, (r + C - 1) % C);
  const int v = peer[(threadIdx.x + 1) % blockDim.x], w = peer_dyn[threadIdx.x];
  cluster.barrier_arrive();
  out[3 * (blockIdx.x * blockDim.x + threadIdx.x)] = v;
  out[3 * (blockIdx.x * blockDim.x + threadIdx.x) + 1] = w;
  out[3 * (blockIdx.x * blockDim.x + threadIdx.x) + 2] = r + 100 * C;
  cluster.barrier_wait();
}

__global__ void cluster_divergent_kernel(int* out) {
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  if (cluster.block_rank() == 0) cluster.sync();  // block 1 never arrives
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

__global__ void big_dyn_kernel(int* out) {
  GK_DYN_SHARED(dyn, int);
  dyn[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = dyn[(threadIdx.x + 1) % blockDim.x];
}

void check_clusters() {
  const int C = 4, bs = 64, nb = 8;
  std::vector<int> out(3 * nb * bs, -1);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = C;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(nb);
  cfg.blockDim = dim3(bs);
  cfg.dynamicSmemBytes = bs * sizeof(int);
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  expect(cudaLaunchKernelEx(&cfg, cluster_kernel, out.data()) == cudaSuccess, "cluster launch");
  expect(cudaGetLastError() == cudaSuccess, "cluster launch error");
  for (int b = 0; b < nb; ++b)
    for (int t = 0; t < bs; ++t) {
      const int r = b % C, base = b - r, i = 3 * (b * bs + t);
      const int peer = base + (r + 1) % C;
      expect(out[i] == 1000 * peer + (t + 1) % bs, "map_shared_rank reads the peer's static shared memory",
             out[i], 1000 * peer + (t + 1) % bs);
      expect(out[i + 1] == (r + C - 1) % C, "map_shared_rank reads the peer's dynamic shared memory", out[i + 1]);
      expect(out[i + 2] == r + 100 * C, "block_rank / num_blocks", out[i + 2], r + 100 * C);
    }
  gk_emu::LaunchRecord rec = gk_emu::last_launch();
  expect(rec.cluster.x == unsigned(C) && rec.grid.x == unsigned(nb), "last_launch records the cluster");

  cfg.gridDim = dim3(6);  // not a multiple of the cluster
  expect(cudaLaunchKernelEx(&cfg, cluster_kernel, out.data()) == cudaErrorInvalidConfiguration,
         "a grid that is not a multiple of the cluster is rejected");
  (void)cudaGetLastError();
  attr[0].val.clusterDim.x = 2;
  cfg.gridDim = dim3(2);
  expect(cudaLaunchKernelEx(&cfg, cluster_divergent_kernel, out.data()) == cudaErrorLaunchFailure,
         "a cluster barrier not reached by every block fails the launch");
  expect(gk_emu::last_error_message().find("divergent") != std::string::npos, "divergent cluster barrier message");
  (void)cudaGetLastError();

  std::vector<int> o2(64, -1);
  GK_LAUNCH(big_dyn_kernel, 1, 64, 64 * 1024, nullptr, o2.data());
  expect(cudaGetLastError() == cudaErrorInvalidValue, "more than 48 KiB of dynamic shared memory needs the attribute");
  expect(cudaFuncSetAttribute(big_dyn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess,
         "cudaFuncSetAttribute");
  GK_LAUNCH(big_dyn_kernel, 1, 64, 64 * 1024, nullptr, o2.data());
  expect(cudaGetLastError() == cudaSuccess && o2[5] == 6, "64 KiB of dynamic shared memory after the attribute");
}

// ---- deliberate cluster races (see racy_kernel below for the handshake) ----------------------------------
int cl_started = 0, cl_written = 0;

__global__ void cluster_racy_kernel(float* out) {
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  GK_SHARED(sh, float, 64);
  if (cluster.block_rank() == 0 && threadIdx.x == 0) {
    __atomic_store_n(&cl_started, 1, __ATOMIC_RELAXED);
    while (!__atomic_load_n(&cl_written, __ATOMIC_RELAXED)) {
    }
    out[0] = *cluster.map_shared_rank(sh + 1, 1);  // missing cluster.sync() between the peer's write and this
  } else if (cluster.block_rank() == 1 && threadIdx.x == 0) {
    while (!__atomic_load_n(&cl_started, __ATOMIC_RELAXED)) {
    }
    sh[1] = 1.f;
    __atomic_store_n(&cl_written, 1, __ATOMIC_RELAXED);
  }
  cluster.sync();  // the exit is safe: only the read above is unordered
}

// The reader signals that it has left the cluster barrier before the peer exits: otherwise the peer could
// exit, refill its shared memory and arrive at the end-of-cluster barrier while the reader is still taking
// the barrier's mutex on its way out of cluster.sync(), which orders the refill before the read.
int ex_ready = 0, ex_done = 0;

__global__ void cluster_exit_racy_kernel(float* out) {
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  GK_SHARED(sh, float, 64);
  sh[threadIdx.x] = 2.f;
  cluster.sync();
  if (cluster.block_rank() == 1) {
    if (threadIdx.x == 0) {
      while (!__atomic_load_n(&ex_ready, __ATOMIC_RELAXED)) {
      }
      __atomic_store_n(&ex_done, 1, __ATOMIC_RELAXED);
    }
    return;  // missing cluster barrier before exit: block 0 still reads this block's shared memory
  }
  if (threadIdx.x == 0) {
    __atomic_store_n(&ex_ready, 1, __ATOMIC_RELAXED);
    while (!__atomic_load_n(&ex_done, __ATOMIC_RELAXED)) {
    }
    for (int k = 0; k < 1000; ++k)
      for (int i = 0; i < 64; ++i) out[i] = *cluster.map_shared_rank(sh + i, 1);
  }
}

int run_cluster_race(bool exit_race) {
  std::vector<float> out(64);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(2);
  cfg.blockDim = dim3(64);
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, exit_race ? cluster_exit_racy_kernel : cluster_racy_kernel, out.data());
  printf("cluster race kernel ran\n");
  return 0;
}

void check_emulator() {
  std::vector<int> out(2 * 256, -1);
  GK_LAUNCH(shuffle_kernel, 2, 64, 0, nullptr, out.data());
  expect(cudaGetLastError() == cudaSuccess, "shuffle kernel launch");
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 64; ++t) {
      const int nb = (t + 1) % 64, w = nb / 32;
      expect(out[b * 256 + t] == 496 + 3200 * w, "xor-shuffle warp sum via shared memory", out[b * 256 + t],
             496 + 3200 * w);
      const int lane = t & 31, v = lane + 100 * (t / 32);
      expect(out[b * 256 + 64 + t] == (lane + 3 < 32 ? v + 3 : v), "shfl_down", out[b * 256 + 64 + t]);
      expect(out[b * 256 + 128 + t] == 5 + 100 * (t / 32), "shfl broadcast", out[b * 256 + 128 + t]);
    }
  std::vector<int> o2(64, 0);
  GK_LAUNCH(divergent_kernel, 1, 64, 0, nullptr, o2.data());
  expect(cudaGetLastError() == cudaErrorLaunchFailure, "divergent __syncthreads must fail the launch");
  expect(gk_emu::last_error_message().find("divergent") != std::string::npos, "divergent barrier message");
  (void)cudaGetLastError();
  {  // the error message is sticky until the next failed launch; reset by a fresh failure below
  }
  GK_LAUNCH(early_return_kernel, 1, 64, 0, nullptr, o2.data());
  expect(cudaGetLastError() == cudaErrorLaunchFailure, "early return + __syncthreads must fail the launch");
  std::vector<float> f(2, 0.f);
  GK_LAUNCH(fresh_shared_kernel, 2, 32, 0, nullptr, f.data());
  expect(cudaGetLastError() == cudaSuccess, "fresh shared launch");
  expect(f[0] == 1.f && isnan(f[1]), "shared memory is garbage (NaN) at the start of each block", f[1]);
  check_clusters();
}

// ---- a deliberate race: thread 0 reads what thread 1 writes, with no barrier in between ---------------
// A handshake through relaxed atomics (which give ThreadSanitizer no happens-before edge) makes the two
// accesses overlap in time on every run: thread 1 writes only after thread 0 has left the block's start
// barrier, and thread 0 reads only after the write. Without it, a loaded machine could let thread 1 reach
// the end-of-block barrier before thread 0 woke from the start barrier; the barrier's mutex then orders the
// write before the read and the race goes unreported.
int race_started = 0, race_written = 0;

__global__ void racy_kernel(float* out) {
  GK_SHARED(sh, float, 64);
  if (threadIdx.x == 0) {
    __atomic_store_n(&race_started, 1, __ATOMIC_RELAXED);
    while (!__atomic_load_n(&race_written, __ATOMIC_RELAXED)) {
    }
    out[0] = sh[1];  // missing __syncthreads() between the write below and this read
  } else if (threadIdx.x == 1) {
    while (!__atomic_load_n(&race_started, __ATOMIC_RELAXED)) {
    }
    sh[1] = 1.f;
    __atomic_store_n(&race_written, 1, __ATOMIC_RELAXED);
  }
}

// ---- kernels against double precision ------------------------------------------------------------------
template <int DT>
void run_kernels(int64_t B, int64_t T, int64_t V, int64_t pad, int block, std::mt19937& rng) {
  typedef typename gk::Elem<DT>::T ET;
  const int64_t st = V + pad, sb = T * st + 3, N = B * T;
  std::vector<ET> buf(size_t(B * sb + 8));
  std::normal_distribution<float> nd(0.f, 3.f);
  for (auto& e : buf) e = gk::Elem<DT>::store(nd(rng));
  const ET* x = buf.data() + 1;  // an odd element offset: rows start off the 16-byte grid
  std::vector<int64_t> ids(N);
  for (int64_t n = 0; n < N; ++n) ids[n] = int64_t(rng() % uint32_t(V));
  const float tau = 0.8f;
  const gk::Rows rows{x, DT, B, T, V, sb, st, ids.data(), tau};

  // double-precision reference of each row (from the dtype-rounded logits)
  std::vector<double> lse_r(N), ent_r(N), logp_r(N), max_r(N);
  for (int64_t n = 0; n < N; ++n) {
    const ET* row = x + (n / T) * sb + (n % T) * st;
    double m = -INFINITY;
    for (int64_t v = 0; v < V; ++v) m = fmax(m, double(gk::Elem<DT>::load(row[v])) / tau);
    max_r[n] = m * tau;
    double s = 0, sz = 0;
    for (int64_t v = 0; v < V; ++v) {
      const double z = double(gk::Elem<DT>::load(row[v])) / tau, e = exp(z - m);
      s += e;
      sz += e * z;
    }
    lse_r[n] = m + log(s);
    ent_r[n] = lse_r[n] - sz / s;
    logp_r[n] = double(gk::Elem<DT>::load(row[ids[n]])) / tau - lse_r[n];
  }
  std::vector<float> logp(N), stats(2 * N), ent(N);
  expect(gkcuda::logprobs_fwd(rows, gk::Outputs{logp.data(), stats.data(), ent.data(), nullptr, 0, 0}, block,
                              nullptr) == cudaSuccess,
         "forward launch");
  for (int64_t n = 0; n < N; ++n) {
    const double lse = double(stats[2 * n]) / tau + stats[2 * n + 1];
    expect(fabs(stats[2 * n] - max_r[n]) <= 1e-6 * fabs(max_r[n]), "row max (raw logits)", stats[2 * n], max_r[n]);
    expect(fabs(lse - lse_r[n]) < 1e-5 * fmax(1.0, fabs(lse_r[n])), "lse", lse, lse_r[n]);
    expect(fabs(ent[n] - ent_r[n]) < 1e-5 * fmax(1.0, fabs(ent_r[n])), "entropy", ent[n], ent_r[n]);
    expect(fabs(logp[n] - logp_r[n]) < 1e-5 * fmax(1.0, fabs(logp_r[n])), "logp", logp[n], logp_r[n]);
  }
  // backward, inplace into a copy of the logits (row n = 1 masked: exact zeros)
  std::vector<ET> xin(buf);
  ET* xo = xin.data() + 1;
  std::vector<float> gl(N), ge(N);
  for (int64_t n = 0; n < N; ++n) {
    gl[n] = n == 1 ? 0.f : nd(rng);
    ge[n] = n == 1 ? 0.f : nd(rng);
  }
  gk::TokenInputs grads{};
  grads.stats = stats.data();
  grads.entropy = ent.data();
  grads.g_logp = gl.data();
  grads.g_entropy = ge.data();
  expect(gkcuda::logprobs_bwd(gk::Rows{xo, DT, B, T, V, sb, st, ids.data(), tau}, grads,
                              gk::Outputs{nullptr, nullptr, nullptr, xo, sb, st}, block, nullptr) == cudaSuccess,
         "backward launch");
  // dtype rounding of the output: half an ulp of the 16-bit format (2^-9 bf16, 2^-12 fp16) relative
  const double rel = DT == gk::DT_F32 ? 1e-6 : (DT == gk::DT_BF16 ? 4e-3 : 5e-4);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t off = (n / T) * sb + (n % T) * st;
    for (int64_t v = 0; v < V; ++v) {
      const double z = double(gk::Elem<DT>::load(x[off + v])) / tau, p = exp(z - lse_r[n]);
      const double want = (gl[n] * ((v == ids[n]) - p) - ge[n] * p * (z - lse_r[n] + ent_r[n])) / tau;
      const double got = gk::Elem<DT>::load(xo[off + v]);
      if (n == 1) expect(got == 0.0, "masked row: exact zero", got, 0.0);
      else expect(fabs(got - want) <= rel * fabs(want) + 2e-6 * (fabs(gl[n]) + fabs(ge[n])), "inplace gradient", got, want);
    }
  }
  // fused (grpo clip loss with KL), out of place
  std::vector<float> adv(N), coef(N), old(N), ref(N), logp2(N), ent2(N);
  for (int64_t n = 0; n < N; ++n) {
    adv[n] = nd(rng) / 3.f;
    coef[n] = n == 0 ? 0.f : 0.1f;
    old[n] = float(logp_r[n]) + 0.1f * nd(rng) / 3.f;
    ref[n] = float(logp_r[n]) + 0.1f * nd(rng) / 3.f;
  }
  gk::TokenInputs tok{};
  tok.old_logps = old.data();
  tok.ref_logps = ref.data();
  tok.advantages = adv.data();
  tok.coef = coef.data();
  gk::LossParams lp{};
  lp.loss_code = gk::LOSS_CLIP;
  lp.epsilon_low = 0.2f;
  lp.epsilon_high = 0.28f;
  lp.beta = 0.04f;
  lp.use_bias_correction_kl = true;
  lp.sapo_temperature_pos = 1.f;
  lp.sapo_temperature_neg = 1.05f;
  // 1: the 3-pass fused_kernel; 2, 4, 8: the cluster kernel with that many blocks per row
  for (int cluster : {1, 2, 4, 8}) {
    std::vector<ET> out(size_t(N * V));
    expect(gkcuda::fused_fwd_bwd(rows, tok, lp, gk::Outputs{logp2.data(), nullptr, ent2.data(), out.data(), T * V, V},
                                 block, nullptr, cluster) == cudaSuccess,
           "fused launch");
    expect(gk_emu::last_launch().cluster.x == unsigned(cluster), "the fused launch ran the asked kernel");
    for (int64_t n = 0; n < N; ++n) {
      // the 3-pass kernel's forward sums in the forward kernel's order; the cluster kernel in its own
      if (cluster == 1)
        expect(logp2[n] == logp[n] && ent2[n] == ent[n], "fused forward equals the forward kernel", logp2[n], logp[n]);
      expect(fabs(logp2[n] - logp_r[n]) < 1e-5 * fmax(1.0, fabs(logp_r[n])), "fused logp", logp2[n], logp_r[n]);
      expect(fabs(ent2[n] - ent_r[n]) < 1e-5 * fmax(1.0, fabs(ent_r[n])), "fused entropy", ent2[n], ent_r[n]);
      const double g = coef[n] * gk::dloss_dlogp(float(logp_r[n]), 1, old[n], 1, ref[n], adv[n], lp);
      const int64_t off = (n / T) * sb + (n % T) * st;
      for (int64_t v = 0; v < V; ++v) {
        const double z = double(gk::Elem<DT>::load(x[off + v])) / tau, p = exp(z - lse_r[n]);
        const double want = g * ((v == ids[n]) - p) / tau;
        const double got = gk::Elem<DT>::load(out[n * V + v]);
        expect(fabs(got - want) <= rel * fabs(want) + 1e-5 * fabs(g), "fused gradient", got, want);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "kernels";
  if (mode == "race") {
    std::vector<float> out(64);
    GK_LAUNCH(racy_kernel, 1, 64, 0, nullptr, out.data());
    printf("race kernel ran\n");
    return 0;
  }
  if (mode == "cluster_race" || mode == "cluster_exit_race") return run_cluster_race(mode == "cluster_exit_race");
  check_emulator();
  std::mt19937 rng(1234);
  run_kernels<gk::DT_F32>(2, 2, 1003, 5, 96, rng);  // 3 warps, ragged V, unaligned rows
  run_kernels<gk::DT_BF16>(1, 3, 1003, 3, 64, rng);
  run_kernels<gk::DT_F16>(2, 1, 517, 1, 128, rng);
  run_kernels<gk::DT_BF16>(1, 2, 64, 0, 32, rng);  // one warp, fully vectorised rows
  if (failures) {
    fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  printf("ok\n");
  return 0;
}

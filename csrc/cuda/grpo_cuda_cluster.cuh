// grpo_cuda_cluster.cuh: the fused kernel at two HBM passes (sm_90 / sm_100): each row is read from HBM once,
// held on chip in the distributed shared memory of a thread-block cluster, and the gradient is written from
// there.
//
// One cluster of C blocks (C in {2, 4, 8}, chosen by fused_cluster_size in grpo_cuda.cu) per row; block r of
// the cluster owns a contiguous chunk of the row's 16-byte vectors (split_row's main part, ceil(nvec / C)
// vectors per block) in its dynamic shared memory, block 0 the scalar head and block C - 1 the scalar tail
// (at most 7 elements each, kept in registers). Per row:
//   load      every block streams its chunk from HBM (4 x 128-bit loads in flight per thread), stores the raw
//             16 bytes to shared memory and folds the elements into the online state (m, s, t) of
//             grpo_cuda_kernels.cuh (StatsOp); the target logit x[id] is read here too, before any write;
//   reduce    block_reduce leaves the block's state in sh[32]; a cluster barrier; every thread merges the C
//             block states, read from the peers' shared memory (map_shared_rank), in rank order 0..C-1, so
//             every block computes bit-identical row statistics (m, log s) and entropy;
//   gradient  g = coef * gk::dloss_dlogp(logp) (the function the 3-pass fused kernel calls), then each block
//             writes dL/dx of its chunk from shared memory (GradOp: 128-bit stores when the output row has
//             the input row's alignment) and, after a block barrier, the block owning element id writes the
//             target term (gk::grad_elem), as write_grad does.
// A block must not exit while a peer may still read its sh[32]: each block arrives at a second cluster
// barrier after its reads of the peers and waits on it just before it exits (the split arrive / wait
// hides the barrier behind the gradient loop).
// Inplace (out == x): every global read of x (chunk, head, tail, x[id]) precedes the first cluster barrier,
// every write follows it.
// Rows longer than the largest cluster's shared memory, and GPUs before sm_90, use fused_kernel.
#pragma once

#include <stdint.h>

#include "grpo_cuda_kernels.cuh"

#ifndef GK_CUDA_EMU
#include <cooperative_groups.h>
#endif

#ifndef GK_DYN_SHARED
#define GK_DYN_SHARED(name, T) extern __shared__ __align__(16) T name[]
#endif

namespace gkcuda {

// Writes exact zeros in the same places a GradOp writes (masked rows; the logits are not used).
template <int DT>
struct ZeroOp {
  typedef typename gk::Elem<DT>::T ET;
  ET* orow;
  int64_t head;
  bool vec_out;

  GK_HD void scalar(int64_t i, float) { orow[i] = gk::Elem<DT>::store(0.f); }
  template <int N>
  GK_HD void vec(int64_t k, const float (&)[N]) {
    float o[N];
#pragma unroll
    for (int j = 0; j < N; ++j) o[j] = 0.f;
    ET* dst = orow + head + k * N;
    if (vec_out) {
      __stwb(reinterpret_cast<typename Vec<DT>::Raw*>(dst), Vec<DT>::pack(o));
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) dst[j] = gk::Elem<DT>::store(0.f);
    }
  }
};

// The LseState at `p` (this block's shared memory) in block `rank` of the cluster: mapa + ld.shared::cluster
// on the GPU (a distributed-shared-memory load the SASS checks can see), map_shared_rank in the emulator.
__device__ __forceinline__ gk::LseState peer_state(const gk::LseState* p, int rank) {
  gk::LseState v;
#ifdef GK_CUDA_EMU
  v = *cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%3];\n\t"
               "ld.shared::cluster.f32 %1, [%3+4];\n\t"
               "ld.shared::cluster.f32 %2, [%3+8];"
               : "=f"(v.m), "=f"(v.s), "=f"(v.t)
               : "r"(remote)
               : "memory");
#endif
  return v;
}

// barrier.cluster.arrive.relaxed: the arrival that only says "this block has finished reading its peers'
// shared memory" (the values read are already in registers), without the release fence of a full
// cluster.sync(); cluster.barrier_wait() completes it.
__device__ __forceinline__ void cluster_arrive_relaxed() {
#ifdef GK_CUDA_EMU
  cooperative_groups::this_cluster().barrier_arrive();
#else
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}

// Visits the vectors [k0, k1) of the row held in shared memory (sbuf[k - k0]), f.vec(k, xs), each thread
// taking every blockDim.x-th vector, 4 in flight.
template <int DT, class F>
__device__ __forceinline__ void visit_chunk(const typename Vec<DT>::Raw* sbuf, int64_t k0, int64_t k1, F& f) {
  typedef Vec<DT> Vc;
  constexpr int N = Vc::N;
  const int64_t bs = blockDim.x;
  int64_t k = k0 + threadIdx.x;
  for (; k + 3 * bs < k1; k += 4 * bs) {
    typename Vc::Raw r[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) r[u] = sbuf[k - k0 + u * bs];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float xs[N];
      Vc::unpack(r[u], xs);
      f.vec(k + u * bs, xs);
    }
  }
  for (; k < k1; k += bs) {
    float xs[N];
    Vc::unpack(sbuf[k - k0], xs);
    f.vec(k, xs);
  }
}

template <int DT>
__global__ void __launch_bounds__(kMaxBlock) fused_cluster_kernel(KArgs a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  typedef typename gk::Elem<DT>::T ET;
  typedef Vec<DT> Vc;
  typedef typename Vc::Raw Raw;
  constexpr int N = Vc::N;
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  GK_SHARED(sh, gk::LseState, 33);
  GK_DYN_SHARED(gk_cluster_buf, uint4);
  Raw* const sbuf = reinterpret_cast<Raw*>(gk_cluster_buf);
  const int C = static_cast<int>(cluster.num_blocks()), r = static_cast<int>(cluster.block_rank());
  const int64_t n = blockIdx.x / C, tid = threadIdx.x, bs = blockDim.x;
  const ET* xrow = static_cast<const ET*>(a.x.logits) + row_offset(n, a.x.T, a.x.stride_b, a.x.stride_t);
  ET* orow = static_cast<ET*>(a.out.grad) + row_offset(n, a.x.T, a.out.grad_stride_b, a.out.grad_stride_t);
  const int64_t V = a.x.V, id = a.x.ids[n];
  const bool valid = id >= 0 && id < V;
  const float it = a.inv_tau;
  const float x_id = valid ? gk::Elem<DT>::load(xrow[id]) : gk::quiet_nan();
  const Span sp = split_row<DT>(xrow, V);
  const int64_t per = (sp.nvec + C - 1) / C;
  const int64_t k0 = r * per < sp.nvec ? r * per : sp.nvec, k1 = k0 + per < sp.nvec ? k0 + per : sp.nvec;

  // ---- load: HBM -> shared memory, with the online statistics --------------------------------------
  StatsOp<true> op{it, gk::neg_inf(), 0.f, 0.f};
  const bool has_h = r == 0 && tid < sp.head, has_t = r == C - 1 && sp.tail + tid < V;
  float xh = 0.f, xt = 0.f;
  if (has_h) {
    xh = gk::Elem<DT>::load(xrow[tid]);
    op.scalar(tid, xh);
  }
  if (has_t) {
    xt = gk::Elem<DT>::load(xrow[sp.tail + tid]);
    op.scalar(sp.tail + tid, xt);
  }
  {
    const Raw* vp = reinterpret_cast<const Raw*>(xrow + sp.head);
    int64_t k = k0 + tid;
    for (; k + 3 * bs < k1; k += 4 * bs) {
      Raw v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = vp[k + u * bs];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        sbuf[k - k0 + u * bs] = v[u];
        float xs[N];
        Vc::unpack(v[u], xs);
        op.vec(k + u * bs, xs);
      }
    }
    for (; k < k1; k += bs) {
      const Raw v = vp[k];
      sbuf[k - k0] = v;
      float xs[N];
      Vc::unpack(v, xs);
      op.vec(k, xs);
    }
  }

  // ---- reduce: block, then cluster ------------------------------------------------------------------
  gk::LseState st;
  st.m = op.m;
  st.s = op.s;
  st.t = op.t;
  block_reduce<true>(st, it, sh);  // sh[32] = this block's state; ends with a block barrier
  cluster.sync();                  // every block's sh[32] (and shared chunk) is written; no x read follows
  gk::LseState row;
  gk::lse_init(row);
  for (int q = 0; q < C; ++q) gk::lse_merge(row, peer_state(sh + 32, q), it);
  cluster_arrive_relaxed();  // this block has read its peers; matched by the wait before exit

  const float ls = logf(row.s), H = gk::entropy_value(row);
  const float logp = gk::shifted_logit(x_id, row.m, ls, it);  // NaN for an invalid id
  if (r == 0 && tid == 0) {
    a.out.logp[n] = logp;
    a.out.entropy[n] = H;
  }

  // ---- gradient: shared memory -> HBM ---------------------------------------------------------------
  const uintptr_t rel = reinterpret_cast<uintptr_t>(orow) - reinterpret_cast<uintptr_t>(xrow);
  const bool vec_out = (rel & 15u) == 0;
  const float coef = a.in.coef[n];
  if (coef == 0.f) {  // masked row: exact zeros whatever its logits (uniform branch)
    ZeroOp<DT> z{orow, sp.head, vec_out};
    if (has_h) z.scalar(tid, 0.f);
    if (has_t) z.scalar(sp.tail + tid, 0.f);
    visit_chunk<DT>(sbuf, k0, k1, z);
  } else {
    const float* old = a.in.old_logps;
    const float* ref = a.in.ref_logps;
    const float g = coef * gk::dloss_dlogp(logp, old != nullptr, old ? old[n] : 0.f, ref != nullptr,
                                           ref ? ref[n] : 0.f, a.in.advantages[n], a.lp);
    GradOp<DT, false> gop{it, row.m, ls, H, g * it, 0.f, orow, sp.head, vec_out};
    if (has_h) gop.scalar(tid, xh);
    if (has_t) gop.scalar(sp.tail + tid, xt);
    visit_chunk<DT>(sbuf, k0, k1, gop);
    __syncthreads();  // the chunk loop may have written out[id] with the non-target value
    if (valid && tid == 0) {
      const int owner = id < sp.head ? 0 : (id >= sp.tail ? C - 1 : static_cast<int>((id - sp.head) / N / per));
      if (owner == r)
        orow[id] = gk::Elem<DT>::store(gk::grad_elem(gk::shifted_logit(x_id, row.m, ls, it), H, 1, g, 0.f, it));
    }
  }
  cluster.barrier_wait();  // no block exits (freeing its sh[32]) before every peer has read it
#endif
}

}  // namespace gkcuda

"""The native C++ CPU backend (``csrc/``): numerics on every code path, determinism, build behaviour.

The shared reference parametrisation of ``tests/test_backends.py`` runs on ``native`` too whenever it is
built (``_helpers.backends()``); this file adds the paths only the native kernels have (scratch-budget
splits of ``V*`` and of token blocks, uncached hidden rows, tiled pairwise own-response terms, strided
and low-precision inputs) and the build contract (no compiler -> one warning and the torch backend;
importing compiles nothing; concurrent first builds). Numerical tests skip, with the reason, where the
extension is not built.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

import nthr_kernels as nk
from nthr_kernels.ops import native_lib
from nthr_kernels.ops.score_tokens.native_impl import score_tokens as native_score_tokens
from nthr_kernels.registry import native_available, resolve

from nthr_kernels.ops.advantages.native_impl import pairwise_cheaper, pairwise_group

from _helpers import (TOL, assert_matches_reference, backends, case, grpo_advantages,
                      run, run_impl, stable_seed, validated)

NATIVE = native_available()
needs_native = pytest.mark.skipif(
    not NATIVE, reason=f"native C++ ops not built here: {native_lib.unavailable_reason() or 'unknown'}"
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_native_is_built_or_skipped_with_reason():
    if not NATIVE:
        pytest.skip(f"native backend unavailable: {native_lib.unavailable_reason()}")
    assert "native" in nk.available_backends()
    assert "native" in backends(), "the shared reference parametrisation must include native"
    assert resolve("auto", torch.device("cpu")) == "native"


# --------------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------------
# budgets (float32 elements, shared by the threads): tiny ones force one-column V* blocks, two-token
# blocks and uncached hidden rows; middle ones tile the pairwise own-response Gram matrices.
BUDGETS = [64, 1024, 4096, None]


@needs_native
@pytest.mark.parametrize("score_positive", [False, True])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("anchor", ["all", "others"])
@pytest.mark.parametrize("source", ["weight+logprobs", "weight", "logits"])
def test_budget_paths_match_reference(budget, anchor, source, score_positive):
    """Both settings of score_positive: the anchors come from N_i = E_i^T H_i without per-token positive
    scores (default), or the positive tokens are scored too; either way the reference's numbers."""
    b = case(n_groups=3, group_size=4, lengths=[17, 20, 3, 0, 25, 18, 19, 1, 2, 40, 16, 21], d=32, vocab=97,
             seed=budget or 7, pattern="mixed", holes=True, temperature=0.7)
    kw = dict(with_logprobs=source == "weight+logprobs", use_logits=source == "logits", anchor=anchor, beta=0.5,
              score_positive=score_positive)
    assert_matches_reference(run_impl(b, "native", budget, **kw), run(b, "reference", **kw), b)


# --------------------------------------------------------------------------------------------------
# the per-group path: pairwise where a group's positive tokens are few
# --------------------------------------------------------------------------------------------------
def _two_path_batch(seed: int, dtype=torch.float32, packed=False):
    """Groups 0, 1 with one short correct response (the pairwise path), groups 2, 3 mostly correct (factored)."""
    lengths = [6, 20, 22, 18, 21, 5, 19, 23, 20, 24, 22, 3, 4, 25, 21, 23]
    b = case(n_groups=4, group_size=4, lengths=lengths, d=48, vocab=397, seed=seed, dtype=dtype, packed=packed,
             holes=not packed, temperature=0.8)
    b.rewards = torch.tensor([1., 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1])
    b.advantages = grpo_advantages(b.rewards, b.group_size)
    return b


def _paths(b, budget=None, score_positive=False) -> list:
    """``pairwise_group`` of every active group of a synthetic batch (True: pairwise)."""
    batch = validated(b)
    tok_group, tok_pos = batch.resp_group[batch.tok_resp], batch.positive[batch.tok_resp]
    out = []
    for g in range(batch.group_ids.numel()):
        at = tok_group == g
        if bool(batch.group_active[g]):
            out.append(pairwise_group(int((at & tok_pos).sum()), int(at.sum()), torch.unique(batch.tok_ids[at]).numel(),
                                      b.hidden.shape[-1], score_positive, budget))
    return out


@needs_native
def test_pairwise_rule_is_the_python_rule():
    """nthr::native_pairwise_group = pairwise_cheaper where the scratch fits; never where it does not."""
    g = torch.Generator().manual_seed(3)
    for _ in range(400):
        tp, tn, nv, d = (int(x) for x in torch.randint(1, 3000, (4,), generator=g))
        sp = bool(torch.randint(0, 2, (), generator=g))
        assert pairwise_group(tp, tp + tn, nv, d, sp, 1 << 50) == pairwise_cheaper(tp, tp + tn, nv, d, sp), (tp, tn, nv, d, sp)
    assert pairwise_cheaper(1, 50, 1000, 8, False) and not pairwise_group(1, 50, 1000, 8, False, 1)  # scratch
    assert not pairwise_group(0, 50, 1000, 8, False)  # no positive token: no path to take


@needs_native
@pytest.mark.parametrize("score_positive", [False, True])
@pytest.mark.parametrize("anchor", ["all", "others"])
@pytest.mark.parametrize("source", ["weight+logprobs", "weight", "logits"])
@pytest.mark.parametrize("budget", [1 << 15, None])  # 1 << 15: K_e and the hidden cache just fit one slice
def test_pairwise_and_factored_groups_match_reference(budget, source, anchor, score_positive):
    """One call with groups on both paths: scores, anchors (tau) and selection are the reference's."""
    b = _two_path_batch(stable_seed("paths", budget, source, anchor, score_positive))
    assert _paths(b, budget, score_positive) == [True, True, False, False]
    kw = dict(with_logprobs=source == "weight+logprobs", use_logits=source == "logits", anchor=anchor, beta=0.7,
              score_positive=score_positive)
    res = run_impl(b, "native", budget, **kw)
    assert_matches_reference(res, run(b, "reference", **kw), b)
    if not score_positive:  # positive tokens are not scored on either path: 0
        positive = (b.rewards > 0.5)[:, None].expand_as(b.mask) & b.mask
        assert not bool(res.scores[positive].any())


@needs_native
@pytest.mark.parametrize("score_positive", [False, True])
@pytest.mark.parametrize("anchor", ["all", "others"])
def test_pairwise_same_bits_at_one_and_two_threads(anchor, score_positive):
    b = _two_path_batch(stable_seed("paths-threads", anchor, score_positive))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(run(b, "native", anchor=anchor, score_positive=score_positive))
    finally:
        torch.set_num_threads(before)
    for f in ("scores", "token_advantages", "selected", "tau"):
        assert torch.equal(getattr(outs[0], f).nan_to_num(0.5), getattr(outs[1], f).nan_to_num(0.5)), f


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True])
def test_pairwise_groups_low_precision(dtype, packed):
    b = _two_path_batch(5, dtype=dtype, packed=packed)
    assert_matches_reference(run(b, "native"), run(b, "reference"), b, dtype=dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_strided_inputs_and_dtypes(dtype, packed):
    """Non-contiguous hidden / weight / logits (read in place through their strides) in every dtype."""
    b = case(n_groups=2, group_size=5, lengths=(0, 14), d=24, vocab=71, seed=3, dtype=dtype, packed=packed,
             holes=not packed)
    ref = run(b, "reference")
    # strided copies holding the same values
    h = b.hidden
    hs = torch.empty(h.shape[:-1] + (2 * h.shape[-1],), dtype=h.dtype)[..., ::2]
    hs.copy_(h)
    w = b.lm_head_weight
    ws = torch.empty(w.shape[1], w.shape[0], dtype=w.dtype).T
    ws.copy_(w)
    assert not hs.is_contiguous() and not ws.is_contiguous()
    b2 = type(b)(**{**b.__dict__, "hidden": hs, "lm_head_weight": ws})
    assert_matches_reference(run(b2, "native"), ref, b, dtype=dtype if dtype != torch.float64 else torch.float32)
    ref_l = run(b, "reference", use_logits=True)
    assert_matches_reference(run(b2, "native", use_logits=True), ref_l, b,
                             dtype=dtype if dtype != torch.float64 else torch.float32)


def _assert_scores_close(s, ref, tp, v, d):
    """Native score_tokens against the float64 reference on the same (float32-representable) inputs: float32
    sums of at most max(T+, |V|, d) terms per product, so within 2e-5 sqrt(that count) of the largest score."""
    assert float((s - ref).abs().max()) <= 2e-5 * float(ref.abs().max()) * math.sqrt(max(tp, v, d))


@needs_native
@pytest.mark.parametrize("path", ["factored", "pairwise"])
@pytest.mark.parametrize("budget", [16, 200, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_score_tokens_paths(path, budget, dtype):
    g = torch.Generator().manual_seed(11)
    # factored is cheaper for many tokens and a small vocabulary slice; pairwise for few tokens
    tp, tn, v, d = (60, 70, 9, 6) if path == "factored" else (3, 5, 40, 33)
    hp, hn = torch.randn(tp, d, generator=g).to(dtype), torch.randn(tn, d, generator=g).to(dtype)
    ep, en = torch.randn(tp, v, generator=g).to(dtype), torch.randn(tn, v, generator=g).to(dtype)
    en = en.T.contiguous().T  # strided
    s = native_score_tokens(hp, hn, ep, en, budget)
    ref = nk.score_tokens(hp, hn, ep, en, backend="reference")
    assert s.dtype == torch.float32 and s.shape == (tn,)
    _assert_scores_close(s, ref, tp, v, d)


@needs_native
@pytest.mark.parametrize("budget", [2000, None])  # 2000: V* in several column blocks, short row blocks
@pytest.mark.parametrize("path", ["factored", "pairwise"])
def test_score_tokens_same_bits_at_any_thread_count(path, budget):
    """The work items of native score_tokens follow the thread count (one per thread); every score is summed in
    the same order whichever item holds it: 1, 2 and 3 threads give the same bits (odd sizes, 13 rows per
    item or more, so items end inside the GEMM's 12-row panels too)."""
    g = torch.Generator().manual_seed(stable_seed("score-threads", path, budget))
    tp, tn, v, d = (61, 157, 83, 29) if path == "factored" else (3, 41, 97, 35)
    hp, hn = torch.randn(tp, d, generator=g), torch.randn(tn, d, generator=g)
    ep, en = torch.randn(tp, v, generator=g), torch.randn(tn, v, generator=g)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(native_score_tokens(hp, hn, ep, en, budget))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    _assert_scores_close(outs[0], nk.score_tokens(hp, hn, ep, en, backend="reference"), tp, v, d)


@needs_native
def test_score_tokens_empty_sides():
    z = torch.zeros(0, 4)
    out = nk.score_tokens(z, torch.randn(3, 4), torch.zeros(0, 5), torch.randn(3, 5), backend="native")
    assert torch.equal(out, torch.zeros(3))
    assert nk.score_tokens(torch.randn(2, 4), z, torch.randn(2, 5), torch.zeros(0, 5), backend="native").shape == (0,)


@needs_native
def test_matches_torch_backend_at_a_larger_shape():
    """Many groups of uneven size (dynamic scheduling), Zipf ids, default budget: native agrees with
    the torch backend as closely as two float32 implementations can."""
    b = nk.synthetic.make_batch(9, 8, (0, 70), 64, 3000, seed=5)
    for kw in (dict(), dict(with_logprobs=False), dict(anchor="others", beta=0.3)):
        t, n = run(b, "torch", **kw), run(b, "native", **kw)
        assert torch.equal(t.active, n.active)
        scale = float(t.scores.abs().max())
        assert float((t.scores - n.scores).abs().max()) <= 1e-5 * scale
        torch.testing.assert_close(n.tau, t.tau, rtol=1e-5, atol=1e-5 * scale, equal_nan=True)
        assert float((t.selected != n.selected).float().mean()) < 0.01


@needs_native
def test_deterministic_bits():
    b = nk.synthetic.make_batch(6, 8, (0, 60), 48, 2000, seed=9, dtype=torch.bfloat16)
    for kw in (dict(), dict(with_logprobs=False, anchor="others")):
        r1, r2 = run(b, "native", **kw), run(b, "native", **kw)
        for f in ("scores", "token_advantages", "selected", "tau", "eta"):
            a, c = getattr(r1, f), getattr(r2, f)
            assert torch.equal(a.nan_to_num(0.5), c.nan_to_num(0.5)), f


@needs_native
@pytest.mark.parametrize("with_logprobs", [True, False])
def test_peak_scratch_within_documented_bound(with_logprobs):
    """native_lib's docstring: at most ~32 * SCRATCH_ELEMS bytes plus O(n) and an int32 [|V|] marker per
    thread (at most kWorkers = 8); never [n, |V|]."""
    from nthr_kernels.testing import peak_rss_rise

    budget = 1 << 18
    b = nk.synthetic.make_batch(6, 4, (100, 150), 64, 60000, seed=0)
    fn = lambda: run_impl(b, "native", budget, with_logprobs=with_logprobs)  # noqa: E731
    fn()
    rise = peak_rss_rise(fn)
    if rise is None:
        pytest.skip("peak RSS is not measurable on this platform")
    bound = 32 * budget + 256 * b.n_tokens + 8 * 4 * 60000 + (24 << 20)
    assert rise <= bound, f"peak rise {rise / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    assert rise < b.n_tokens * 60000 * 4 / 8  # far below one [n, |V|] float32 tensor


@needs_native
def test_native_rejects_non_cpu_batches():
    b = case(seed=1)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to pass")
    b2 = type(b)(**{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.__dict__.items()})
    with pytest.raises(ValueError, match="^backend: 'native' runs on CPU"):
        run(b2, "native")


# --------------------------------------------------------------------------------------------------
# build contract (fresh processes)
# --------------------------------------------------------------------------------------------------
def _python(code: str, env: dict, timeout=600) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


SMALL_RUN = """
    import warnings, torch, nthr_kernels as nk
    from nthr_kernels.synthetic import make_batch
    b = make_batch(2, 4, (1, 6), 8, 31, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r1 = nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, **b.kwargs())
        r2 = nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, **b.kwargs())
    ours = [str(w.message) for w in caught if "nthr_kernels" in str(w.message)]
    print("WARNINGS", len(ours))
    for m in ours: print("MSG", m)
    print("BACKENDS", nk.available_backends())
    print("EQUAL", torch.equal(r1.token_advantages, r2.token_advantages))
"""


def test_without_a_compiler_one_warning_and_torch_backend(tmp_path):
    out = _python(SMALL_RUN, {"CXX": str(tmp_path / "no-such-c++"), "NTHR_KERNELS_CACHE": str(tmp_path / "cache"),
                              "NTHR_NATIVE": "1"})
    assert out.returncode == 0, out.stderr
    assert "WARNINGS 1" in out.stdout, out.stdout + out.stderr
    assert "no C++ compiler found" in out.stdout
    # the reason once, not preceded by a log line blaming OpenMP (the probe ran the missing compiler)
    assert "OpenMP" not in out.stderr, out.stderr
    assert "'native'" not in out.stdout.split("BACKENDS", 1)[1].splitlines()[0]
    assert "EQUAL True" in out.stdout


def test_ninja_of_the_environment_serves_without_activating_it(tmp_path, monkeypatch):
    """``pip install ninja`` (the dev extra) puts ninja in the environment's bin/, which is not on PATH when
    ``.venv/bin/python`` runs unactivated (``make test``): the build found no ninja ("ninja is not installed
    (pip install ninja)") on a machine without a system ninja. Now it looks there and puts it on PATH for
    the build only."""
    try:
        import ninja
        folders = [sysconfig.get_path("scripts"), getattr(ninja, "BIN_DIR", None)]
    except ImportError:
        folders = [sysconfig.get_path("scripts")]
    if not any(f and shutil.which("ninja", path=f) for f in folders):
        pytest.skip("no ninja installed in this environment")
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    bin_dir = tmp_path / "bin"  # a PATH with the compiler and no ninja
    bin_dir.mkdir()
    (bin_dir / "c++").symlink_to(cxx)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("CXX", "c++")
    assert shutil.which("ninja") is None
    assert native_lib._missing_toolchain() is None
    with native_lib._ninja_on_path():
        assert subprocess.run(["ninja", "--version"], capture_output=True).returncode == 0
    assert os.environ["PATH"] == str(bin_dir)


def test_opt_out_variable_is_silent(tmp_path):
    out = _python(SMALL_RUN, {"NTHR_NATIVE": "0", "NTHR_KERNELS_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    assert "WARNINGS 0" in out.stdout and "EQUAL True" in out.stdout
    assert not (tmp_path / "cache").exists()


def test_import_compiles_nothing_and_leaves_cuda_alone(tmp_path):
    code = """
        import sys, torch, nthr_kernels, nthr_kernels.library, nthr_kernels.ops.native_lib
        print("CUDA_INIT", torch.cuda.is_initialized())
        print("CPP_EXT", "torch.utils.cpp_extension" in sys.modules)
    """
    cache = tmp_path / "cache"
    out = _python(code, {"NTHR_KERNELS_CACHE": str(cache)})
    assert out.returncode == 0, out.stderr
    assert "CUDA_INIT False" in out.stdout
    assert not cache.exists(), "importing must not build"


@pytest.mark.slow
def test_concurrent_first_builds_share_one_cache(tmp_path):
    """Two processes start on an empty cache at once: one compiles, the other waits for the lock and
    loads the result; both get the native backend."""
    if native_lib._missing_toolchain() is not None:
        pytest.skip(f"cannot build here: {native_lib._missing_toolchain()}")
    cache = str(tmp_path / "cache")
    code = SMALL_RUN
    env = {**os.environ, "NTHR_KERNELS_CACHE": cache, "NTHR_NATIVE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se
        assert "'native'" in so and "WARNINGS 0" in so, so + se
    builds = [d for d in os.listdir(cache) if not d.endswith(".lock")]
    assert len(builds) == 1 and os.path.isfile(os.path.join(cache, builds[0], "SHA256")), builds
    assert sum("compiling the native CPU ops" in se for _, se in outs) == 1


_BITS_RUN = """
    import hashlib, torch, nthr_kernels as nk
    from nthr_kernels.synthetic import make_batch
    torch.set_num_threads(2)
    b = make_batch(6, 8, (8, 40), 32, 500, seed=3)
    r = nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, backend="native", **b.kwargs())
    print("BITS", hashlib.sha256(r.scores.numpy().tobytes() + r.token_advantages.numpy().tobytes()).hexdigest())
"""


def _bits(out: subprocess.CompletedProcess) -> str:
    return next(ln for ln in out.stdout.splitlines() if ln.startswith("BITS "))


@pytest.fixture(scope="module")
def plain_thread_build(tmp_path_factory):
    """A build by a compiler that rejects -fopenmp (its workers are then plain threads): ``(env, first run)``,
    ``env`` selecting it for a fresh process, the first run that built it running ``_BITS_RUN``."""
    if not NATIVE:
        pytest.skip(f"native C++ ops not built here: {native_lib.unavailable_reason() or 'unknown'}")
    if native_lib._missing_toolchain() is not None:
        pytest.skip(f"cannot build here: {native_lib._missing_toolchain()}")
    tmp = tmp_path_factory.mktemp("plain")
    real = shutil.which(os.environ.get("CXX", "c++"))
    cxx = tmp / "c++-without-openmp"
    cxx.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "error: unsupported option -fopenmp" >&2;'
                   f' exit 1; }}; done\nexec "{real}" "$@"\n')
    cxx.chmod(0o755)
    env = {"CXX": str(cxx), "NTHR_KERNELS_CACHE": str(tmp / "cache"), "NTHR_NATIVE": "1"}
    return env, _python(_BITS_RUN, env)


@pytest.mark.slow
def test_compiler_without_openmp_builds_with_plain_threads(plain_thread_build):
    """A compiler that rejects -fopenmp still builds the native ops (its workers are then plain threads),
    with the same bits as the OpenMP build at 2 threads."""
    _, plain = plain_thread_build
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "building without OpenMP" in plain.stderr, plain.stderr[-3000:]
    openmp = _python(_BITS_RUN, {"NTHR_KERNELS_CACHE": native_lib.cache_root().as_posix(), "NTHR_NATIVE": "1"})
    assert openmp.returncode == 0, openmp.stderr[-3000:]
    assert _bits(plain) == _bits(openmp)


# pthread_create for std::thread (its start routine is libstdc++'s) fails with EAGAIN once `allow` more
# have started, as at a process or cgroup thread limit; other threads (OpenMP's, Python's) are left alone
_REFUSE_THREADS_SHIM = r"""
#include <dlfcn.h>
#include <pthread.h>
#include <cerrno>
#include <cstring>
using create_fn = int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
static int allowed = -1, refused = 0;  // -1: refuse nothing
extern "C" void nthr_test_refuse_threads(int allow) { allowed = allow; }
extern "C" int nthr_test_refused() { return refused; }
extern "C" int pthread_create(pthread_t* t, const pthread_attr_t* a, void* (*f)(void*), void* arg) {
  static create_fn real = reinterpret_cast<create_fn>(dlsym(RTLD_NEXT, "pthread_create"));
  Dl_info info;
  if (allowed >= 0 && dladdr(reinterpret_cast<void*>(f), &info) && info.dli_fname &&
      std::strstr(info.dli_fname, "libstdc++")) {
    if (allowed == 0) { ++refused; return EAGAIN; }
    --allowed;
  }
  return real(t, a, f, arg);
}
"""

_REFUSED_RUN = """
    import ctypes, hashlib, torch, nthr_kernels as nk
    from nthr_kernels.synthetic import make_batch
    torch.set_num_threads(4)  # four workers: the first of three new threads starts, the second is refused
    b = make_batch(6, 8, (8, 40), 32, 500, seed=3)
    run = lambda: nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, backend="native", **b.kwargs())
    free = run()
    shim = ctypes.CDLL(None)
    shim.nthr_test_refuse_threads(1)
    r = run()
    print("REFUSED", shim.nthr_test_refused())
    print("SAME", torch.equal(r.scores, free.scores) and torch.equal(r.token_advantages, free.token_advantages))
    print("BITS", hashlib.sha256(r.scores.numpy().tobytes() + r.token_advantages.numpy().tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_plain_threads_that_cannot_start_leave_the_bits_alone(plain_thread_build, tmp_path):
    """Without OpenMP, a worker thread that cannot be created (std::thread throws std::system_error: a process
    or cgroup thread limit) ended the process: the exception left for_each_item while an earlier worker was
    running, and destroying its joinable std::thread calls std::terminate. The items now run on the threads
    that did start, the caller's among them: the same bits as with every thread (they never depend on the
    thread count). A preloaded pthread_create refuses the threads."""
    env, plain = plain_thread_build
    shim = tmp_path / "refuse_threads.so"
    src = tmp_path / "refuse_threads.cpp"
    src.write_text(_REFUSE_THREADS_SHIM)
    subprocess.run([*native_lib._cxx(), "-shared", "-fPIC", "-O1", str(src), "-o", str(shim), "-ldl"], check=True,
                   capture_output=True)
    out = _python(_REFUSED_RUN, {**env, "LD_PRELOAD": str(shim)})
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-3000:]}"
    refused = int(next(ln for ln in out.stdout.splitlines() if ln.startswith("REFUSED ")).split()[1])
    assert refused >= 1, out.stdout  # the refusal happened, so the fallback ran
    assert "SAME True" in out.stdout, out.stdout
    assert _bits(out) == _bits(plain)


# --------------------------------------------------------------------------------------------------
# determinism across thread counts, zero sizes, positive tokens
# --------------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("score_positive", [False, True])
@pytest.mark.parametrize("source", ["weight+logprobs", "logits"])
def test_shared_row_chunks_same_bits_at_one_and_two_threads(source, score_positive):
    """Groups of 400 to 1,100 tokens: at two threads a worker out of groups takes row chunks (192 rows) of the
    errors and score products and whole N_i of the groups still running, against a W*^T or M packed once
    (csrc/params.h, Team; advantages.cpp, for_row_chunks); at one thread nothing is shared or packed ahead.
    The bits are the same (uneven groups, so that one worker runs out first; the default budget and one that
    splits V*)."""
    b = case(n_groups=5, group_size=6, lengths=(60, 190), d=40, vocab=700, seed=stable_seed(source, score_positive),
             temperature=1.1)
    kw = dict(with_logprobs=source == "weight+logprobs", use_logits=source == "logits", score_positive=score_positive)
    before = torch.get_num_threads()
    try:
        for budget in (None, 60_000):
            outs = []
            for threads in (1, 2, 2):
                torch.set_num_threads(threads)
                outs.append(run_impl(b, "native", budget, **kw))
            for o in outs[1:]:
                for f in ("scores", "token_advantages", "selected", "tau", "eta"):
                    a, c = getattr(outs[0], f), getattr(o, f)
                    assert torch.equal(a.nan_to_num(0.5), c.nan_to_num(0.5)), f"{f} differs at budget {budget}"
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("budget", [1024, 8192, None])
@pytest.mark.parametrize("anchor", ["all", "others"])
@pytest.mark.parametrize("source", ["weight+logprobs", "weight", "logits"])
def test_same_bits_at_one_and_two_threads(source, anchor, budget):
    """Block sizes depend on the scratch budget and the group only: 1 and 2 threads give the same bits
    (odd sizes; budgets that split V*, the token blocks and the vocabulary chunks)."""
    b = case(n_groups=5, group_size=5, lengths=(1, 41), d=37, vocab=1013, seed=stable_seed(source, anchor, budget),
             temperature=0.9)
    kw = dict(with_logprobs=source == "weight+logprobs", use_logits=source == "logits", anchor=anchor,
              score_positive=True)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(run_impl(b, "native", budget, **kw))
    finally:
        torch.set_num_threads(before)
    for f in ("scores", "token_advantages", "selected", "tau", "eta"):
        a, c = getattr(outs[0], f), getattr(outs[1], f)
        assert torch.equal(a.nan_to_num(0.5), c.nan_to_num(0.5)), f"{f} differs between 1 and 2 threads"


@needs_native
@pytest.mark.parametrize("budget", [300, None])
def test_implied_mass_same_bits_at_one_and_two_threads(budget):
    """The old_logprobs check's native arithmetic: one item per group, blocks from the budget alone."""
    from nthr_kernels.core.checks import logprob_sample
    from nthr_kernels.ops.advantages.native_impl import implied_mass

    b = case(n_groups=7, group_size=4, lengths=(0, 30), d=21, vocab=397, seed=stable_seed("implied", budget))
    batch = validated(b)
    idx = logprob_sample(batch.n_tokens)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(implied_mass(batch, idx, budget))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def _native_args(b, **kw):
    """The positional arguments of ``nthr::native_advantages`` for a synthetic batch (anchor "all")."""
    batch = validated(b, **kw)
    eta_g = torch.full((batch.group_ids.numel(),), 0.5, dtype=torch.float64)
    return [batch.hidden, batch.tok_a, batch.tok_b, batch.tok_ids, batch.tok_resp, batch.resp_group, batch.positive,
            batch.adv, batch.group_active, eta_g, batch.lm_head_weight, batch.logits, None, 1.0, 1.0, False, 1 << 20]


_IMPLIED = ("out = torch.ops.nthr.native_check_values(args[0], args[1], args[2], args[3], args[10], False, False, "
            "{group}, torch.zeros({idx}.numel()), {idx}, int(args[5].max()) + 1, 1.0, 1 << 20)")
_NORMS = "out = torch.ops.nthr.native_check_values(args[0], {tok_a}, args[2]{cut}, {ids}, args[10], True, False, None, None, None, 1, 1.0, 1 << 20)"


# Direct calls of the ops (no public checks before them) with zero sizes or indices out of range: a clear
# RuntimeError naming the argument, or the right empty result; never a signal. Each runs in a fresh process
# so that a crash fails the test instead of killing the run.
DIRECT_CALLS = {
    "d0-weight": ("args[0] = args[0][..., :0]; args[10] = args[10][:, :0]", "hidden: the hidden size"),
    "d0-logits": ("args[0] = args[0][..., :0]; args[11], args[10] = args[0].new_zeros(args[0].shape[:-1] + (5,)), None",
                  "hidden: the hidden size"),
    "d0-score_tokens": ("out = torch.ops.nthr.native_score_tokens(torch.zeros(3, 0), torch.zeros(4, 0), "
                        "torch.randn(3, 5), torch.randn(4, 5), 64, False); assert out.tolist() == [0.0] * 4", None),
    "no-tokens": ("args[1:5] = [x[:0] for x in args[1:5]]", None),
    "no-groups": ("args[1:10] = [x[:0] for x in args[1:10]]", None),
    "vocab0": ("args[10] = args[10][:0]", "tok_ids: index"),
    "tok_a-out-of-range": ("args[1] = args[1] + 10**6", "tok_a: index"),
    "tok_b-out-of-range": ("args[2] = args[2] - 10**6", "tok_b: index"),
    "resp_group-out-of-range": ("args[5] = args[5] + 99", "resp_group: index"),
    "short-positive": ("args[6] = args[6][:1]", "positive: expected"),
    "weight-wrong-d": ("args[10] = args[10][:, 1:]", "lm_head_weight: expected"),
    "bad-temperature": ("args[13] = 0.0", "temperature"),
    # the value checks' op, old log-probs part: (hidden, tok_a, tok_b, tok_ids, weight, norms, all rows, tok_group,
    # logprobs, idx, groups, T, E)
    "implied-idx-out-of-range": (_IMPLIED.format(group="args[5][args[4]]", idx="torch.tensor([0, 10**6])"), "idx: index"),
    "implied-group-out-of-range": (_IMPLIED.format(group="args[5][args[4]] + 99", idx="torch.tensor([0, 1])"),
                                   "tok_group: index"),
    "implied-no-sample": (_IMPLIED.format(group="args[5][args[4]]", idx="torch.zeros(0, dtype=torch.long)")
                          + "; assert out.numel() == 2", None),
    # the value checks' norm pass
    "norms-tok_a-out-of-range": (_NORMS.format(tok_a="args[1] + 10**6", cut="", ids="args[3]"), "tok_a: index"),
    "norms-id-out-of-range": (_NORMS.format(tok_a="args[1]", cut="", ids="args[3] + 10**6"), "tok_ids: index"),
    "norms-no-tokens": (_NORMS.format(tok_a="args[1][:0]", cut="[:0]", ids="args[3][:0]")
                        + "; assert out.tolist() == [0.0, 0.0]", None),
    "checks-half-sample": ("out = torch.ops.nthr.native_check_values(args[0], args[1], args[2], args[3], args[10], "
                           "True, False, None, None, torch.tensor([0]), 1, 1.0, 1 << 20)", "idx/logprobs/tok_group"),
    "pairwise-rule-degenerate": ("assert not any(torch.ops.nthr.native_pairwise_group(*a, False, e) for a in "
                                 "((0, 0, 0, 0), (1, 1, 0, 0), (-1, 5, 3, 2), (1, 2, -3, 4)) for e in (0, 1, -5))", None),
}


@needs_native
def test_direct_calls_never_crash():
    """All cases in one fresh process (a crash fails the test instead of killing the run)."""
    code = f"""
        import sys, torch
        sys.path.insert(0, {os.path.join(REPO, "tests")!r})
        import nthr_kernels.ops.native_lib as nl
        assert nl.available()
        from test_native import DIRECT_CALLS, _native_args
        from _helpers import case
        b = case(n_groups=2, group_size=3, lengths=(1, 6), d=8, vocab=31, seed=4)
        for name, (change, _) in DIRECT_CALLS.items():
            args = _native_args(b, with_logprobs=False)
            try:
                exec(change)
                if "torch.ops" not in change:
                    torch.ops.nthr.native_advantages(*args)
            except RuntimeError as e:
                print(name, "ERROR", str(e).splitlines()[0], flush=True)
            else:
                print(name, "OK", flush=True)
    """
    out = _python(code, {"NTHR_KERNELS_CACHE": native_lib.cache_root().as_posix()})
    assert out.returncode == 0, f"exit {out.returncode} after:\n{out.stdout}\n{out.stderr[-2000:]}"
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    for name, (_, message) in DIRECT_CALLS.items():
        got = lines[name]
        if message is None:
            assert got == "OK", (name, got)
        else:
            assert got.startswith("ERROR") and message in got, (name, got)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_direct_call_active_group_without_positive_tokens_scores_zero(threads):
    """A direct call that marks active a group with no positive token (validation never does: such a group is
    inactive): M is an empty sum, so its scores are 0 and nothing is selected, the same bits at any thread count.
    M was never written: the scores read the worker's scratch (at 1 thread the previous group's M, scores up to 13)."""
    b = case(n_groups=2, group_size=4, lengths=[30, 30, 30, 30, 3, 2, 4, 3], d=16, vocab=50, seed=4)
    b.rewards = torch.tensor([1., 1, 1, 0, 1, 1, 1, 0])
    b.advantages = grpo_advantages(b.rewards, b.group_size)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for with_logprobs in (False, True):
            args = _native_args(b, with_logprobs=with_logprobs)
            if with_logprobs:  # log Z from the old log-probs (taken from the token's own logit: V* in one block)
                batch = validated(b, with_logprobs=True)
                args[12] = batch.gather(batch.old_logprobs).to(torch.float32)
            assert bool(args[8].all()) and bool(args[6][:4].any())
            args[6] = args[6].clone()
            args[6][4:] = False  # group 1: no positive response left, still marked active
            scores, selected, _, tau, _ = torch.ops.nthr.native_advantages(*args)
            in_g1 = args[5][args[4]] == 1
            assert torch.equal(scores[in_g1], torch.zeros(int(in_g1.sum()))), scores[in_g1]
            assert not bool(selected[in_g1].any()) and float(tau[1]) == math.inf
            assert bool(scores[~in_g1].ne(0).any())  # group 0 is scored as usual
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# the native ops' own GEMM (csrc/gemm.cpp), through nthr::native_mm
# --------------------------------------------------------------------------------------------------
# (m, k, n): odd sizes, one row or column, K past one K block (256), N past one N block (512), M past
# one packed A block (144) and the rows of one native_mm item (256).
MM_SHAPES = [(1, 1, 1), (7, 13, 5), (12, 256, 32), (13, 257, 33), (145, 300, 47), (300, 513, 600), (3, 1000, 17)]


def _mm_operands(m, k, n, layout, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g)
    if layout == "transposed":  # column-major views of the same values
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    elif layout == "strided":  # rows further apart than their length
        a = torch.randn(m, k + 5, generator=g)[:, 2:k + 2]
        b = torch.randn(k, n + 3, generator=g)[:, 1:n + 1]
    return a, b


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("shape", MM_SHAPES, ids=["x".join(map(str, s)) for s in MM_SHAPES])
def test_native_mm_matches_float64(shape, layout):
    """Every native op's matrix products go through gemm (gemm.cpp): a packed kernel of the library's own where
    the CPU has AVX-512, or AVX2 and FMA, else ATen's mm. Each entry within the float32 score tolerance of |A| |B| (a float32 sum of K
    products errs by at most ~K * 2^-24 of it)."""
    a, b = _mm_operands(*shape, layout, stable_seed("mm", shape, layout))
    a0, b0 = a.clone(), b.clone()
    out = torch.ops.nthr.native_mm(a, b)
    want = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert ((out.double() - want).abs() <= TOL[torch.float32] * scale).all()
    assert torch.equal(a, a0) and torch.equal(b, b0)  # inputs untouched


@needs_native
def test_native_mm_same_bits_at_one_and_two_threads_and_empty_sizes():
    a, b = _mm_operands(600, 300, 70, "strided", stable_seed("mm-threads"))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(torch.ops.nthr.native_mm(a, b))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(torch.ops.nthr.native_mm(torch.ones(3, 0), torch.ones(0, 4)), torch.zeros(3, 4))
    assert torch.ops.nthr.native_mm(torch.ones(0, 5), torch.ones(5, 4)).shape == (0, 4)
    with pytest.raises(RuntimeError, match="native_mm: b: expected 5 rows"):
        torch.ops.nthr.native_mm(torch.ones(3, 5), torch.ones(4, 4))
    with pytest.raises(RuntimeError, match="native_mm: expected two 2-D float32 CPU tensors"):
        torch.ops.nthr.native_mm(torch.ones(3, 5, dtype=torch.float64), torch.ones(5, 4))


def _cpu_flags() -> set:
    try:
        line = next(ln for ln in open("/proc/cpuinfo").read().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo to read the CPU flags from")
    return set(line.split(":", 1)[1].split())


@needs_native
def test_gemm_engine_is_the_packed_kernel_of_the_cpus_isa():
    engine = native_lib.gemm_engine()
    flags = _cpu_flags()
    want = ("nthr-avx512" if "avx512f" in flags else "nthr-avx2" if {"avx2", "fma"} <= flags else "aten")
    assert engine == want, (engine, sorted(flags & {"avx512f", "avx2", "fma"}))


def _mm_in_kernel_order(a: torch.Tensor, b: torch.Tensor, kc: int = 256) -> torch.Tensor:
    """``a @ b`` summed as csrc/gemm.cpp's packed kernels sum ("Bits" there): per K block of ``kc``, a float32
    fused multiply-add chain from 0 over k in order, then the blocks added to C in order. The FMA is emulated in
    float64 (``a * b`` is exact there; the sum is rounded twice, which differs from one rounding in about one of
    2^29 operations: the fixed seeds of the test below hit none)."""
    a64, b64 = a.double(), b.double()
    out = None
    for k0 in range(0, a.shape[1], kc):
        acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
        for k in range(k0, min(k0 + kc, a.shape[1])):
            acc = (acc.double() + a64[:, k, None] * b64[None, k, :]).float()
        out = acc if out is None else out + acc
    return out


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_native_mm_sums_in_the_kernel_order_bit_for_bit(layout):
    """Both packed kernels (AVX-512 and AVX2) sum every entry in one documented order, so a machine of either
    ISA gives the same bits: native_mm equals that order emulated here, exactly. 13 rows (a full panel of 12 and
    one packed row), 545 columns (full and masked panels of 16 and 32; more than one column block of B, whether
    the L2 size makes it 256 or 512 columns: gemm_col_block), K 600 (three K blocks)."""
    if native_lib.gemm_engine() == "aten":
        pytest.skip("ATen's mm (no AVX2/FMA, or NTHR_NATIVE_GEMM=aten) sums in BLAS's own order")
    a, b = _mm_operands(13, 600, 545, layout, stable_seed("mm-order", layout))
    assert torch.equal(torch.ops.nthr.native_mm(a, b), _mm_in_kernel_order(a, b))


@needs_native
def test_gemm_engines_give_the_same_bits():
    """NTHR_NATIVE_GEMM=avx2 on an AVX-512 CPU runs the AVX2 kernel: its products and a whole op's results equal
    the AVX-512 kernel's bit for bit. Where the CPU lacks an ISA, asking for its kernel is refused by name."""
    code = textwrap.dedent("""
        import hashlib, sys, torch
        sys.path.insert(0, "tests")
        from _helpers import case, run
        from nthr_kernels.ops import native_lib
        try:
            engine = native_lib.gemm_engine()
        except ValueError as e:
            print("refused", e)
            raise SystemExit(0)
        g = torch.Generator().manual_seed(5)
        a, w = torch.randn(301, 277, generator=g), torch.randn(533, 277, generator=g)
        b = case(n_groups=4, group_size=5, lengths=(0, 41), d=23, vocab=307, seed=13)
        outs = [torch.ops.nthr.native_mm(a, w.t()), torch.ops.nthr.native_mm(a.t().contiguous(), a),
                run(b, "native").scores, run(b, "native", with_logprobs=False, anchor="others").scores]
        print(engine, hashlib.sha256(b"".join(o.numpy().tobytes() for o in outs)).hexdigest())
    """)
    flags = _cpu_flags()
    seen = {}
    for want, has in (("avx512", "avx512f" in flags), ("avx2", {"avx2", "fma"} <= flags)):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, NTHR_NATIVE_GEMM=want),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        if has:
            engine, digest = out.stdout.split()
            assert engine == f"nthr-{want}"
            seen[want] = digest
        else:
            assert out.stdout.startswith(f"refused NTHR_NATIVE_GEMM: '{want}' needs a CPU with"), out.stdout
    if len(seen) < 2:
        pytest.skip(f"this CPU runs only {sorted(seen) or 'none'} of the two kernels: nothing to compare")
    assert seen["avx512"] == seen["avx2"]


@needs_native
def test_certain_tokens_score_zero_on_the_aten_gemm_engine():
    """test_certain_tokens_with_lm_head_score_zero (tests/test_backends.py) on ATen's mm, the engine of every CPU
    without AVX2 and FMA: a one-token vocabulary, every token certain, every score 0 and nothing selected. Without old
    log-probs, log Z's product W H^T and the errors' H W*^T rounded the sampled token's logit apart on ATen's mm
    (the packed kernel gives both the same bits): scores of 2e-13 to 4e-13 at T 0.7, 1.0 and 1.3."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        import nthr_kernels as nk
        from _helpers import case, run_impl
        from nthr_kernels.ops import native_lib
        assert native_lib.gemm_engine() == "aten"
        for temperature in (0.7, 1.0, 1.3):
            b = case(seed=3, n_groups=3, group_size=4, lengths=(1, 9), d=8, vocab=1, temperature=temperature)
            for with_logprobs in (False, True):
                for budget in (None, 64):
                    for beta in (1.0, 0.0):
                        res = run_impl(b, "native", budget, with_logprobs=with_logprobs, beta=beta)
                        assert bool(res.active.all())
                        worst = float(res.scores.abs().max())
                        assert worst == 0 and not bool(res.selected.any()), (temperature, with_logprobs, budget, beta, worst)
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, NTHR_NATIVE_GEMM="aten"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@needs_native
def test_aten_gemm_fallback_matches_reference_and_bad_setting_is_refused():
    """NTHR_NATIVE_GEMM=aten: every product on ATen's mm, as on a CPU without AVX2 and FMA (the path CI's
    machines would otherwise never run); the op still matches the reference and gives the same bits at any
    thread count. Any other value is refused."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        import nthr_kernels as nk
        from _helpers import assert_matches_reference, case, run
        from nthr_kernels.ops import native_lib
        print(native_lib.gemm_engine())
        b = case(n_groups=4, group_size=5, lengths=(0, 37), d=19, vocab=301, seed=11)
        for kw in (dict(), dict(with_logprobs=False, anchor="others")):
            assert_matches_reference(run(b, "native", **kw), run(b, "reference", **kw), b)
        a = torch.randn(30, 17)
        torch.testing.assert_close(torch.ops.nthr.native_mm(a, a.t()), a @ a.t())
        # the same bits at any thread count on this engine too (score_tokens' items followed the thread
        # count, and ATen's mm rounds a row differently at another row count: 1.2e-4 apart at 1 and 2 threads)
        g = torch.Generator().manual_seed(1)
        hp, hn, ep, en = (torch.randn(s, generator=g) for s in [(37, 67), (290, 67), (37, 131), (290, 131)])
        outs = []
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            outs.append((torch.ops.nthr.native_score_tokens(hp, hn, ep, en, 2000, False),
                         torch.ops.nthr.native_score_tokens(hp, hn, ep, en, 1 << 22, False),
                         run(b, "native").scores))
        assert all(torch.equal(x, y) for o in outs[1:] for x, y in zip(outs[0], o))
    """)
    env = dict(os.environ, NTHR_NATIVE_GEMM="aten")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] == "aten"
    env["NTHR_NATIVE_GEMM"] = "mkl"
    out = subprocess.run([sys.executable, "-c", "from nthr_kernels.ops import native_lib; native_lib.gemm_engine()"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "ValueError: NTHR_NATIVE_GEMM: expected 'auto', 'avx512', 'avx2' or 'aten', got 'mkl'" in out.stderr


@needs_native
def test_native_mm_non_finite_values_stay_in_their_rows_and_columns():
    """Padding lanes of the packed panels (rows past a panel's last, columns past a block's last) must never mix
    a non-finite value into a valid entry: Inf/NaN in one row of A or one column of B shows up exactly where
    torch.mm puts it."""
    g = torch.Generator().manual_seed(stable_seed("mm-nonfinite"))
    a, b = torch.randn(13, 300, generator=g), torch.randn(300, 35, generator=g)
    a[12, 5], b[7, 33], b[299, 2] = float("inf"), float("nan"), float("-inf")
    for x, y in ((a, b), (a.t().contiguous().t(), b.t().contiguous().t())):
        out, want = torch.ops.nthr.native_mm(x, y), x @ y
        assert torch.equal(torch.isnan(out), torch.isnan(want))
        assert torch.equal(torch.isinf(out), torch.isinf(want))
        ok = torch.isfinite(want)
        assert ((out - want).abs()[ok] <= TOL[torch.float32] * (x.abs() @ y.abs())[ok]).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_certain_tokens_with_old_logprobs_score_zero(dtype, temperature):
    """|V| = 1 with the weight and old log-probs 0: V* is one column block, so log Z comes from each token's
    own logit in the GEMM's epilogue (lz_from_row) and must scale it as the errors do; it took z / T there
    and z * (1/T) fused with the subtraction in the errors: certain tokens got errors of 1e-7, scores of
    1e-13 and were selected at T != 1. (The torch backend takes z_y from another sum than the errors' GEMM,
    so it is not exact here; tests/test_backends.py checks every backend with logits.)"""
    b = case(seed=3, n_groups=3, group_size=4, lengths=(1, 9), d=8, vocab=1, temperature=temperature, dtype=dtype)
    assert bool((b.old_logprobs[b.mask] == 0).all())
    for beta in (1.0, 0.0):
        res = run(b, "native", beta=beta)
        assert bool((res.scores == 0).all()), (beta, float(res.scores.abs().max()))
        assert not bool(res.selected.any()), beta



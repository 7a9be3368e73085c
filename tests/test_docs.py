"""The documentation stays true to what it links, and the site builds.

- docs/contract.md: every link into TRL's source names a line of TRL 1.16 (the installed copy is that
  version) that holds the code the formula follows; ``TRL_LINES`` says, per link, a piece of that first line.
  Every ``contract.md#<heading>`` pointer in a tracked file and every in-page link names a heading of the page.
- Every relative link of README.md, docs/*.md and bench/results/NOTES.md names a file of the repository, and
  a ``#anchor`` into a Markdown file names one of its headings (as a code host renders them).
- The README stays a short entry point (at most 250 lines); its results table quotes only numbers that the
  result file of its row holds.
- ``mkdocs build --strict`` builds the site (mkdocs.yml: every page, the API reference from the docstrings,
  the result pages of bench/results) without a warning, and every page of docs/ is in its navigation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "contract.md"
LINK_DEF = re.compile(
    r"^\[(\w+)\]: https://github\.com/huggingface/trl/blob/v1\.16\.0/trl/trainer/(\w+\.py)(?:#L(\d+)(?:-L(\d+))?)?$",
    re.M)

# link label -> a piece of the first line it points at, in TRL 1.16.0
TRL_LINES = {
    "u586": "per_token_logps = selected_logits - logsumexp_values",
    "u638": "logps = F.log_softmax(chunk, dim=-1)",
    "u703": "logits = logits / temperature",
    "u1041": "correction = count / (count - 1)",
    "t916": 'args.loss_type == "luspo"',
    "t1380": "def get_high_entropy_mask",
    "t2660": "if self.use_vllm and self.vllm_importance_sampling_correction:",
    "t2662": "per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask",
    "t2667": "sequence_level_is =",
    "t2680": '["sequence_truncate", "token_truncate"]',
    "t2686": '["sequence_mask", "token_mask"]',
    "t2765": "mean_grouped_rewards = torch.nanmean",
    "t2774": 'self.scale_rewards == "batch"',
    "t2785": "advantages = rewards - mean_grouped_rewards",
    "t2786": 'if self.scale_rewards != "none":',
    "t2945": "def get_off_policy_mask(",
    "t2971": "@torch.no_grad()",
    "t2997": "log_ratio_clamped = torch.clamp(log_ratio_per_token, -20.0, 20.0)",
    "t3001": "if importance_sampling_ratio is not None:",
    "t3006": "log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)",
    "t3010": "is_nonneg_adv = advantages >= 0",
    "t3015": "log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq",
    "t3049": "if self.top_entropy_quantile < 1.0:",
    "t3058": "if advantages.dim() == 1:",
    "t3066": "old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None",
    "t3073": 'sampling_per_token_logps = inputs.get("sampling_per_token_logps", old_per_token_logps)',
    "t3083": "log_ratio = per_token_logps - old_per_token_logps",
    "t3095": "coef_1 = torch.exp(log_importance_weights)",
    "t3098": "if self.beta != 0.0:",
    "t3104": "if self.args.use_bias_correction_kl:",
    "t3109": 'if self.loss_type == "cispo":',
    "t3112": 'elif self.loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:',
    "t3115": "if self.args.delta is not None:",
    "t3121": 'elif self.loss_type == "sapo":',
    "t3125": 'elif self.loss_type == "vespo":',
    "t3140": "if self.off_policy_mask_threshold is not None:",
    "t3143": "if entropy_mask is not None:",
    "t3146": 'self.loss_type != "vespo"',
    "t3149": "if self.beta != 0.0:",
    "t3153": 'if self.loss_type in ["grpo", "sapo"]:',
    "t3154": "loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()",
    "t3159": "loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)",
    "t3164": "(per_token_loss.size(0) * self.max_completion_length)",
    "t3168": 'elif self.loss_type in ["cispo", "dapo", "vespo"]:',
    "t3170": 'normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes',
    "t3179": "loss = (per_token_loss * mask).sum(-1).mean()",
    "t3189": "if self._entropy_bonus_enabled:",
    "t3192": "effective_mask = mask if entropy_mask is None else mask * entropy_mask",
    "t3199": "entropy_loss = (",
    "t3213": '["policy_loss"].append(',
    "t3254": "def masked_seq_mean(x):",
    "t3259": "def global_masked_mean(x):",
    "t3267": "if self.beta != 0.0:",
    "t3270": '["entropy"].append(global_masked_mean(entropies))',
    "t3274": "is_low_clipped = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)",
    "t3275": "is_high_clipped = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)",
    "t3276": "is_region_clipped = is_low_clipped | is_high_clipped",
    "t3277": '["clip_ratio/low_mean"]',
    "t3278": '["clip_ratio/high_mean"]',
    "t3279": '["clip_ratio/region_mean"]',
    "t3280": "gathered_low_clip =",
    "t3282": "gathered_high_clip =",
    "t3284": 'elif self.loss_type == "cispo":',
    "t3287": 'elif self.loss_type == "vespo":',
    "cfg": None,  # the whole config file
    "c494": "max_completion_length:",
    "c532": "temperature: float",
    "c681": "beta: float",
    "c693": "epsilon: float",
    "c697": "delta: float | None",
    "c705": "epsilon_high: float | None",
    "c714": "sapo_temperature_neg: float",
    "c722": "sapo_temperature_pos: float",
    "c730": "vespo_k_pos: float",
    "c737": "vespo_lambda_pos: float",
    "c745": "vespo_k_neg: float",
    "c752": "vespo_lambda_neg: float",
    "c760": "importance_sampling_level: str",
    "c789": "scale_rewards: str",
    "c801": "loss_type: str",
    "c866": "top_entropy_quantile: float",
    "c876": "entropy_coef: float",
    "c934": "vllm_importance_sampling_mode: str",
    "c947": "vllm_importance_sampling_clip_max: float | None",
    "c955": "vllm_importance_sampling_clip_min: float | None",
    "c963": "off_policy_mask_threshold: float | None",
    "c972": "use_bias_correction_kl: bool",
}


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def page_anchors() -> set[str]:
    return {github_slug(h) for h in re.findall(r"^#{1,6} (.+)$", PAGE.read_text(), re.M)}


def test_trl_links_point_at_the_lines_they_follow():
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"the links are to TRL v1.16.0; trl {trl.__version__} is installed")
    src = Path(trl.__file__).parent / "trainer"
    links = LINK_DEF.findall(PAGE.read_text())
    assert {label for label, *_ in links} == set(TRL_LINES), "a TRL link without an expected line, or the reverse"
    for label, name, first, last in links:
        lines = (src / name).read_text().splitlines()
        if TRL_LINES[label] is None:
            assert not first, label
            continue
        first, last = int(first), int(last or first)
        assert 1 <= first <= last <= len(lines), f"[{label}]: lines {first}-{last} of {name} ({len(lines)} lines)"
        assert TRL_LINES[label] in lines[first - 1], f"[{label}] {name}#L{first} is {lines[first - 1].strip()!r}"


def test_every_link_definition_is_used():
    text = PAGE.read_text()
    for label in TRL_LINES:
        assert re.search(r"\]\[" + label + r"\]", text), f"[{label}] is defined but no formula links it"


def test_section_pointers_name_a_heading():
    anchors = page_anchors()
    in_page = re.findall(r"\]\(#([\w-]+)\)", PAGE.read_text())
    assert in_page and set(in_page) <= anchors, sorted(set(in_page) - anchors)
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    pointers = {}
    for name in files:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".h", ".cuh", ".cu", ".cpp", ".toml", ".txt") or not path.is_file():
            continue
        for anchor in re.findall(r"contract\.md#([\w-]+)", path.read_text(encoding="utf-8", errors="replace")):
            pointers.setdefault(anchor, name)
    assert pointers, "no file points at a section of docs/contract.md"
    missing = {a: f for a, f in pointers.items() if a not in anchors}
    assert not missing, f"pointers to sections docs/contract.md lacks: {missing}"


# ---- links and anchors of the Markdown files -----------------------------------------------------------
LINKED_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "results" / "NOTES.md"]
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def headings(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # a "# comment" in code is no heading
    return {github_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return [t for t in MD_LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    links = relative_links(page)
    broken = []
    for link in links:
        target, _, anchor = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        if not dest.exists():
            broken.append(f"{link}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in headings(dest):
            broken.append(f"{link}: {dest.relative_to(ROOT)} has no heading with the anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_link_check_catches_a_broken_link(tmp_path):
    """The checks above fail on what they are for: a missing file and a missing heading."""
    (tmp_path / "a.md").write_text("# Title\n\n[ok](#title) [gone](b.md) [bad anchor](a.md#nowhere)\n")
    page = tmp_path / "a.md"
    links = relative_links(page)
    assert links == ["#title", "b.md", "a.md#nowhere"]
    assert "title" in headings(page) and "nowhere" not in headings(page)
    assert not (tmp_path / "b.md").exists()


# ---- the README ----------------------------------------------------------------------------------------
README = ROOT / "README.md"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines: it is the entry point, the rest belongs in docs/"


def test_readme_results_table_quotes_its_sources():
    text = README.read_text()
    table = text[text.index("<!-- results-table -->"):text.index("<!-- /results-table -->")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "](bench/results/" in line]
    assert rows, "no row of the README results table links a result file"
    for row in rows:
        source = ROOT / re.search(r"\]\((bench/results/[^)]+\.md)\)", row).group(1)
        held = source.read_text().replace(",", "")
        quoted = re.findall(r"(\d[\d,]*\.?\d*)(?= ms| MiB|x \|| of TRL)", row.split("](bench/results/")[0])
        quoted += re.findall(r"(\d[\d,]*\.?\d*) / ", row)
        assert quoted, row
        for number in quoted:
            assert re.search(r"(?<![\d.])" + re.escape(number.replace(",", "")) + r"(?![\d])", held), (
                f"{number} is not in {source.relative_to(ROOT)}: {row}")


# ---- the site ------------------------------------------------------------------------------------------
def test_every_docs_page_is_in_the_navigation():
    nav = re.findall(r"^  - [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == set(nav), f"pages not in nav: {sorted(pages - set(nav))}; nav entries without a page: " \
        f"{sorted(set(nav) - pages)}"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    """The site builds with ``--strict`` (a broken link, anchor or docstring section fails it), offline."""
    pytest.importorskip("mkdocs", reason="the docs / test extra installs mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs / test extra installs mkdocstrings[python]")
    site = tmp_path / "site"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               NO_MKDOCS_2_WARNING="1")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "WARNING" not in p.stderr, p.stderr
    index = (site / "index.html").read_text()
    for page in ("trl", "usage", "backends", "fused-linear", "vocab-parallel", "install", "benchmarks",
                 "bad-inputs", "contract", "api", "development"):
        assert (site / page / "index.html").is_file(), page
        assert f'href="{page}/"' in index, f"the index page's navigation lacks {page}"
    api = (site / "api" / "index.html").read_text()
    for name in ("grpo_kernels.grpo_loss", "grpo_kernels.GRPOConfig", "grpo_kernels.fused_linear_grpo_loss",
                 "grpo_kernels.vocab_parallel.grpo_loss", "GRPOKernelsTrainer"):
        assert name in api, name
    assert "num_items_in_batch" in api and "{{" not in api, "the docstrings' placeholders were not filled in"
    assert (site / "results" / "NOTES" / "index.html").is_file(), "the result pages of bench/results are served"
    # offline: no page loads a script, stylesheet or font from another host
    for html in site.rglob("*.html"):
        remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"', html.read_text())
        assert not remote, (html.relative_to(site), remote)

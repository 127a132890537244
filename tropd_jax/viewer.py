"""A token-level trust-region viewer: which response tokens TrOPD trains with which term, and why.

    python -m tropd_jax.viewer --student=DIR --teacher=DIR --data=FILE.jsonl --num=4 --out=viewer.html --png

samples a few rollouts (teacher prefix + student continuation, as in training), scores every response token with both
models, and writes an HTML page where each token is coloured by its region:

  * teacher prefix (blue): written by the teacher; trained with the beta-weighted prefix term;
  * trust region (green): on-policy, M_t = 1; trained with the K1 policy gradient -r_t rho_t;
  * outlier (red): on-policy, M_t = 0; trained with the top-k forward KL F_t.

M_t ~ Bernoulli(P_t) is drawn from a fixed key (`--seed`), so a page shows one draw of the stochastic trust region;
the fill level of every token shows P_t itself (a full box is P_t = 1), which needs no draw. Hovering a token shows
P_t, the reward r_t = tau_t - s_t, F_t and both log-probs. `--png` also screenshots the page with headless Chromium.
"""

from __future__ import annotations

import argparse
import functools
import html
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tropd_jax import losses

# Region codes of `TokenView.region`.
PROMPT, PREFIX, TRUST, OUTLIER = 0, 1, 2, 3
REGIONS = {
    PREFIX: ('teacher prefix', '#4c78a8', '#d6e2f0'),  # (name, filled colour, unfilled colour)
    TRUST: ('trust region', '#3a9a3f', '#d4ecd4'),
    OUTLIER: ('outlier', '#d6403a', '#f6d5d3'),
}


class TokenView(NamedTuple):
    """Per-token quantities of the viewer, NumPy arrays [B, T] on the shifted (loss-aligned) grid."""

    region: np.ndarray  # int: PROMPT (prompt / padding), PREFIX, TRUST or OUTLIER
    trust_probability: np.ndarray  # P_t = min(exp(tau_t - s_t), 1)
    reward: np.ndarray  # r_t = tau_t - s_t
    fkl: np.ndarray  # F_t, the top-k forward KL
    student_logprob: np.ndarray  # s_t
    teacher_logprob: np.ndarray  # tau_t


def token_view(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    response_mask: jax.Array,
    prefix_mask: jax.Array,
    key: jax.Array,
    *,
    k: int = 64,
) -> TokenView:
    """Regions and per-token statistics from full logits, with the loss library's definitions.

    Args:
      student_logits, teacher_logits: [B, T, V] over the shared vocabulary; `logits[:, t]` is the distribution of
        `tokens[:, t]` (already shifted, as for `losses.distillation_loss`).
      tokens, response_mask, prefix_mask: [B, T].
      key: PRNG key of the trust-region draw M_t ~ Bernoulli(P_t).
      k: top-k size of F_t (capped at the vocabulary size).
    """
    k = min(k, student_logits.shape[-1])
    arrays = _token_view(student_logits, teacher_logits, tokens, response_mask, prefix_mask, key, k)
    return TokenView(*(np.asarray(x) for x in arrays))


@functools.partial(jax.jit, static_argnums=6)
def _token_view(student_logits, teacher_logits, tokens, response_mask, prefix_mask, key, k):
    stats = losses.token_statistics(student_logits, teacher_logits, tokens, k)
    s, tau = stats.student_logprobs, stats.teacher_logprobs
    p = losses.trust_probability(s, tau)
    trust = jax.random.bernoulli(key, p)
    fkl = losses.topk_kl_from_logprobs(stats.student_topk_logprobs, stats.teacher_topk_logprobs)
    response, prefix = response_mask > 0, (prefix_mask > 0) & (response_mask > 0)
    region = jnp.where(prefix, PREFIX, jnp.where(response, jnp.where(trust, TRUST, OUTLIER), PROMPT))
    return region, p, tau - s, fkl, s, tau


class RolloutView(NamedTuple):
    """One rollout as the page shows it: the prompt text and its response tokens (prompt and padding removed)."""

    prompt: str
    tokens: list[str]  # decoded text of each response token
    region: np.ndarray  # [n] region codes
    trust_probability: np.ndarray  # [n]
    reward: np.ndarray  # [n]
    fkl: np.ndarray  # [n]
    student_logprob: np.ndarray  # [n]
    teacher_logprob: np.ndarray  # [n]
    caption: str = ''  # e.g. the answer and whether it is right


def rollout_views(
    view: TokenView, token_text: Sequence[Sequence[str]], prompts: Sequence[str], captions: Sequence[str] | None = None
) -> list[RolloutView]:
    """Splits a batch `TokenView` into one `RolloutView` per row, keeping response tokens only.

    `token_text[b][t]` is the text of token t of row b on the same shifted grid as `view`.
    """
    out = []
    for b, prompt in enumerate(prompts):
        keep = np.nonzero(view.region[b] != PROMPT)[0]
        out.append(
            RolloutView(
                prompt=prompt,
                tokens=[token_text[b][t] for t in keep],
                region=view.region[b][keep],
                trust_probability=view.trust_probability[b][keep],
                reward=view.reward[b][keep],
                fkl=view.fkl[b][keep],
                student_logprob=view.student_logprob[b][keep],
                teacher_logprob=view.teacher_logprob[b][keep],
                caption='' if captions is None else captions[b],
            )
        )
    return out


_CSS = """
.tropd-viewer { font-family: 'DejaVu Sans', Arial, sans-serif; color: #222; background: #fff; max-width: 1060px;
                padding: 20px; }
.tropd-viewer h1 { font-size: 20px; margin: 0 0 6px; }
.tropd-viewer p.note { font-size: 13px; color: #555; margin: 4px 0 12px; }
.tropd-viewer .legend { display: flex; gap: 18px; font-size: 13px; margin: 8px 0 16px; align-items: center;
                        flex-wrap: wrap; }
.tropd-viewer .swatch { display: inline-block; width: 14px; height: 18px; vertical-align: middle; margin-right: 5px;
                        border: 1px solid #999; }
.tropd-viewer .rollout { border: 1px solid #ccc; border-radius: 6px; padding: 10px 12px; margin-bottom: 14px; }
.tropd-viewer .head { font-size: 13px; color: #444; margin-bottom: 6px; }
.tropd-viewer .prompt { font-family: 'DejaVu Sans Mono', monospace; font-size: 13px; color: #777;
                        white-space: pre-wrap; margin-bottom: 6px; }
.tropd-viewer .response { font-family: 'DejaVu Sans Mono', monospace; font-size: 15px; line-height: 26px; }
.tropd-viewer .tok { position: relative; display: inline-block; min-width: 9px; white-space: pre; padding: 0 1px;
                     margin: 1px 0; border-bottom: 2px solid transparent; }
.tropd-viewer .tok.r1 { border-bottom-color: #4c78a8; }
.tropd-viewer .tok.r2 { border-bottom-color: #3a9a3f; }
.tropd-viewer .tok.r3 { border-bottom-color: #d6403a; }
.tropd-viewer .tok:hover { outline: 2px solid #000; z-index: 2; }
.tropd-viewer .tok:hover::after { content: attr(data-tip); position: absolute; left: 0; top: 28px; z-index: 3;
  white-space: pre; background: #222; color: #fff; font-size: 12px; line-height: 16px; padding: 6px 8px;
  border-radius: 4px; }
"""


def _tooltip(view: RolloutView, i: int) -> str:
    name = REGIONS[int(view.region[i])][0]
    return (
        f'token {view.tokens[i]!r} ({name})\n'
        f'P_t = {view.trust_probability[i]:.3f}\n'
        f'r_t = tau_t - s_t = {view.reward[i]:+.3f}\n'
        f'F_t (top-k FKL) = {view.fkl[i]:.3f}\n'
        f's_t = {view.student_logprob[i]:.3f}, tau_t = {view.teacher_logprob[i]:.3f}'
    )


def _token_html(view: RolloutView, i: int) -> str:
    region = int(view.region[i])
    _, filled, unfilled = REGIONS[region]
    # The filled height of the box is P_t: a threshold-free picture of how likely the token is trusted.
    fill = 100.0 * float(np.clip(view.trust_probability[i], 0.0, 1.0))
    style = f'background: linear-gradient(to top, {filled} {fill:.0f}%, {unfilled} {fill:.0f}%)'
    text = view.tokens[i]
    newline = text.endswith('\n')
    shown = text.replace('\n', '\u21b5') if text else '\u2205'
    color = '#fff' if fill >= 50 else '#222'
    span = (
        f'<span class="tok r{region}" style="{style}; color: {color}" data-tip="{html.escape(_tooltip(view, i))}">'
        f'{html.escape(shown)}</span>'
    )
    return span + ('<br>' if newline else '')


def _summary(view: RolloutView) -> str:
    counts = {r: int(np.sum(view.region == r)) for r in REGIONS}
    on_policy = counts[TRUST] + counts[OUTLIER]
    text = (
        f'{len(view.tokens)} response tokens: {counts[PREFIX]} teacher prefix, {counts[TRUST]} trust region, '
        f'{counts[OUTLIER]} outliers'
    )
    if on_policy:
        text += f'; mean P_t on-policy = {float(np.mean(view.trust_probability[view.region != PREFIX])):.3f}'
    return text


def render_fragment(views: Sequence[RolloutView], *, title: str = 'TrOPD trust-region viewer', note: str = '') -> str:
    """The viewer as an HTML fragment (a `<style>` and one `<div>`, every rule scoped to it): embeddable in a
    notebook output or another page without restyling it."""
    legend = ''.join(
        f'<span><span class="swatch" style="background: linear-gradient(to top, {filled} 60%, {unfilled} 60%)">'
        f'</span>{name}</span>'
        for name, filled, unfilled in REGIONS.values()
    )
    legend += '<span>box fill height = P_t &nbsp;&middot;&nbsp; hover a token for P_t, r_t, F_t</span>'
    parts = [f'<style>{_CSS}</style>', '<div class="tropd-viewer">', f'<h1>{html.escape(title)}</h1>']
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append(f'<div class="legend">{legend}</div>')
    for n, view in enumerate(views):
        head = f'rollout {n}: {_summary(view)}' + (f' &middot; {html.escape(view.caption)}' if view.caption else '')
        tokens = ''.join(_token_html(view, i) for i in range(len(view.tokens)))
        parts.append(
            f'<div class="rollout"><div class="head">{head}</div>'
            f'<div class="prompt">{html.escape(view.prompt)}</div><div class="response">{tokens}</div></div>'
        )
    parts.append('</div>')
    return '\n'.join(parts)


def render_html(views: Sequence[RolloutView], *, title: str = 'TrOPD trust-region viewer', note: str = '') -> str:
    """A self-contained HTML page (no scripts, no external resources) showing every rollout's tokens."""
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f'<body style="margin: 0; background: #fff">\n{render_fragment(views, title=title, note=note)}\n</body></html>'
    )


def find_chromium() -> str | None:
    """Path of a Chromium binary on PATH, or None."""
    for name in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(args: Sequence[str], chromium: str | None) -> subprocess.CompletedProcess:
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError('no chromium binary on PATH (Debian: apt-get install chromium)')
    with tempfile.TemporaryDirectory() as profile:
        command = [
            binary,
            '--headless',
            '--no-sandbox',
            '--disable-gpu',
            '--disable-quic',
            '--no-first-run',
            '--disable-background-networking',
            '--disable-component-update',
            '--disable-sync',
            '--hide-scrollbars',
            f'--user-data-dir={profile}',
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, check=False)


def screenshot(
    html_path: str, png_path: str, *, width: int = 1100, height: int | None = None, chromium: str | None = None
) -> str:
    """Screenshots `html_path` with headless Chromium into `png_path`.

    With `height=None` the page is first loaded once to measure its full height (a small script writes
    `document.body.scrollHeight` into the dumped DOM), so the PNG holds the whole page.
    """
    url = 'file://' + os.path.abspath(html_path)
    if height is None:
        probe = os.path.join(os.path.dirname(os.path.abspath(png_path)), '.viewer_probe.html')
        with open(html_path, encoding='utf-8') as f:
            page = f.read()
        script = (
            "<script>document.addEventListener('DOMContentLoaded', () => document.body.setAttribute("
            "'data-height', Math.ceil(document.body.getBoundingClientRect().bottom)));</script>"
        )
        with open(probe, 'w', encoding='utf-8') as f:
            f.write(page.replace('</body>', script + '</body>'))
        try:
            dom = _chromium([f'--window-size={width},200', '--dump-dom', 'file://' + probe], chromium).stdout
        finally:
            os.remove(probe)
        marker = dom.find('data-height="')
        height = int(dom[marker + 13 : dom.index('"', marker + 13)]) + 4 if marker >= 0 else 1600
    if os.path.exists(png_path):
        os.remove(png_path)  # so a failed run cannot leave an old picture looking like a new one
    result = _chromium([f'--window-size={width},{height}', f'--screenshot={os.path.abspath(png_path)}', url], chromium)
    if not os.path.isfile(png_path):
        raise RuntimeError(f'chromium wrote no screenshot to {png_path}: {result.stderr[-2000:]}')
    return png_path


# ---------------------------------------------------------------------------------------------------------------------
# From checkpoints: sample rollouts as in training, score them with both models, and build the views.


def _score(model, rollout, vocab_size: int) -> jax.Array:
    """Logits [B, S - 1, vocab_size] of `model` over a rollout; `logits[:, t]` predicts `tokens[:, t + 1]`."""
    from flax import nnx

    from tropd_jax.models import forward
    from tropd_jax.scoring import positions as rope_positions

    mask = rollout.input_mask
    positions = rope_positions(mask)
    graphdef, state = nnx.split(model)
    logits, _ = jax.jit(forward, static_argnums=0)(
        graphdef, state, rollout.tokens[:, :-1], positions[:, :-1], mask[:, :-1]
    )
    return logits[..., :vocab_size].astype(jnp.float32)


def visualize_checkpoints(
    student_dir: str,
    teacher_dir: str,
    data: str,
    *,
    num: int = 4,
    prefix_lengths: Sequence[int] = (0, 16),
    max_new_tokens: int = 128,
    seed: int = 0,
    k: int = 64,
    tokenizer_dir: str | None = None,
) -> list[RolloutView]:
    """Rollouts of the first `num` prompts of `data` with the student (row b gets a teacher prefix of
    `prefix_lengths[b % len(prefix_lengths)]` tokens), scored by both models, as `RolloutView`s."""
    from tropd_jax import data as data_lib
    from tropd_jax import grading, models, sampling

    if num < 1:
        raise ValueError(f'num={num} must be >= 1')
    if not prefix_lengths or min(prefix_lengths) < 0:
        raise ValueError(f'prefix_lengths={list(prefix_lengths)} must be non-empty and >= 0')
    tokenizer = models.load_tokenizer(tokenizer_dir or student_dir)
    teacher_tokenizer = tokenizer  # the teacher's own tokenizer files, when it ships them, are checked against it
    if any(os.path.exists(os.path.join(teacher_dir, f)) for f in ('tokenizer.json', 'tokenizer_config.json')):
        from transformers import AutoTokenizer

        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    student, student_config = models.from_pretrained(student_dir)
    teacher, teacher_config = models.from_pretrained(teacher_dir)
    # As in training: samples and scores are restricted to the ids the shared tokenizer can produce.
    vocab_size = models.check_tokenizers_compatible(
        teacher_tokenizer,
        tokenizer,
        teacher_vocab_size=teacher_config.vocab_size,
        student_vocab_size=student_config.vocab_size,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = data_lib.load_prompts(data, tokenizer)[0][:num]
    prompt_tokens, prompt_mask = sampling.pad_prompts([p['prompt_tokens'] for p in prompts], pad_id=pad_id)
    prefix = np.array([prefix_lengths[b % len(prefix_lengths)] for b in range(len(prompts))], np.int32)
    sample_key, trust_key = jax.random.split(jax.random.key(seed))
    rollout = sampling.rollout(
        teacher,
        student,
        prompt_tokens,
        prompt_mask,
        prefix,
        sample_key,
        max_new_tokens=max_new_tokens,
        eos_ids=sampling.eos_ids(tokenizer, student_config),
        pad_id=pad_id,
        vocab_size=vocab_size,
    )
    tokens = rollout.tokens[:, 1:]
    view = token_view(
        _score(student, rollout, vocab_size),
        _score(teacher, rollout, vocab_size),
        tokens,
        rollout.response_mask[:, 1:],
        rollout.prefix_mask[:, 1:],
        trust_key,
        k=k,
    )
    token_text = [[tokenizer.decode([int(t)]) for t in row] for row in np.asarray(tokens)]
    captions = []
    for b, p in enumerate(prompts):
        response = np.asarray(rollout.responses[b])[: int(rollout.lengths[b])]
        completion = tokenizer.decode(response, skip_special_tokens=True)
        caption = f'answer {grading.extract_boxed(completion) or "(none)"}'
        if p['answer'] is not None:
            verdict = 'correct' if grading.grade(completion, p['answer']) else 'wrong'
            caption += f' ({verdict}; reference {p["answer"]})'
        captions.append(caption)
    prompt_text = [tokenizer.decode(p['prompt_tokens'], skip_special_tokens=True).strip() for p in prompts]
    return rollout_views(view, token_text, prompt_text, captions)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description='Token-level trust-region viewer: HTML (and PNG) of a few rollouts.')
    parser.add_argument('--student', required=True, help='student HF checkpoint directory')
    parser.add_argument('--teacher', required=True, help='teacher HF checkpoint directory')
    parser.add_argument('--data', required=True, help="JSONL of prompts ({'problem', 'answer'})")
    parser.add_argument('--tokenizer', default=None, help="tokenizer directory (default: the student's)")
    parser.add_argument('--num', type=int, default=4, help='rollouts to show (the first NUM prompts)')
    parser.add_argument(
        '--prefix_lengths', default='0,16', help='teacher-prefix lengths, comma-separated, cycled over the rollouts'
    )
    parser.add_argument('--max_new_tokens', type=int, default=128)
    parser.add_argument('--k', type=int, default=64, help='teacher top-k of F_t')
    parser.add_argument('--seed', type=int, default=0, help='seeds the sampling and the trust-region draw')
    parser.add_argument('--out', default='viewer.html')
    parser.add_argument('--png', action='store_true', help='also write OUT with .png via headless Chromium')
    parser.add_argument('--width', type=int, default=1100, help='screenshot width in pixels')
    args = parser.parse_args(argv)
    views = visualize_checkpoints(
        args.student,
        args.teacher,
        args.data,
        num=args.num,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        k=args.k,
        tokenizer_dir=args.tokenizer,
        prefix_lengths=[int(x) for x in args.prefix_lengths.split(',')],
    )
    note = (
        f'student {args.student} · teacher {args.teacher} · trust region drawn with seed {args.seed} '
        f"(M_t ~ Bernoulli(P_t)) · F_t over the teacher's top-{args.k}"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
        f.write(render_html(views, note=note))
    print(args.out)
    if args.png:
        print(screenshot(args.out, os.path.splitext(args.out)[0] + '.png', width=args.width))


if __name__ == '__main__':
    main()

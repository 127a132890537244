"""tropd_jax.viewer: per-token statistics against NumPy, the HTML page, a real headless browser, and the CLI."""

import html.parser
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tropd_jax import viewer


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _batch(seed=0, B=3, T=12, V=16):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(B, T, V)) * 2.0
    teacher = rng.normal(size=(B, T, V)) * 2.0
    tokens = rng.integers(0, V, size=(B, T))
    response = np.zeros((B, T), np.int32)
    response[:, 3:] = 1
    response[2, 9:] = 0  # right padding
    prefix = np.zeros((B, T), np.int32)
    prefix[1, 3:6] = 1
    return student, teacher, tokens, response, prefix


def test_token_view_matches_numpy_float64():
    student, teacher, tokens, response, prefix = _batch()
    k = 5
    v = viewer.token_view(
        *(jnp.asarray(x) for x in (student, teacher, tokens, response, prefix)), jax.random.key(0), k=k
    )
    ls, lt = _log_softmax(student), _log_softmax(teacher)
    s = np.take_along_axis(ls, tokens[..., None], -1)[..., 0]
    tau = np.take_along_axis(lt, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(v.student_logprob, s, atol=1e-5)
    np.testing.assert_allclose(v.teacher_logprob, tau, atol=1e-5)
    np.testing.assert_allclose(v.reward, tau - s, atol=1e-5)
    np.testing.assert_allclose(v.trust_probability, np.minimum(np.exp(tau - s), 1.0), atol=1e-5)
    top = np.argsort(-lt, axis=-1)[..., :k]
    pt, lpt, lps = (np.take_along_axis(a, top, -1) for a in (np.exp(lt), lt, ls))
    np.testing.assert_allclose(v.fkl, (pt * (lpt - lps)).sum(-1), atol=1e-4)
    # Regions: prompt / padding, then the prefix, then trust or outlier on the on-policy tokens.
    np.testing.assert_array_equal(v.region == viewer.PROMPT, response == 0)
    np.testing.assert_array_equal(v.region == viewer.PREFIX, prefix == 1)
    on_policy = (response == 1) & (prefix == 0)
    assert np.all(np.isin(v.region[on_policy], [viewer.TRUST, viewer.OUTLIER]))


def test_trust_region_limits_and_frequency():
    student, _, tokens, response, prefix = _batch(T=8)
    args = [jnp.asarray(x) for x in (tokens, response, prefix)]
    # Teacher == student: P_t = 1, every on-policy token is trusted.
    same = viewer.token_view(jnp.asarray(student), jnp.asarray(student), *args, jax.random.key(1), k=4)
    on_policy = (response == 1) & (prefix == 0)
    assert np.all(same.region[on_policy] == viewer.TRUST)
    # A teacher that gives every realised token ~0 probability: every on-policy token is an outlier.
    teacher = np.zeros_like(student)
    np.put_along_axis(teacher, tokens[..., None], -1e4, -1)
    far = viewer.token_view(jnp.asarray(student), jnp.asarray(teacher), *args, jax.random.key(1), k=4)
    assert np.all(far.region[on_policy] == viewer.OUTLIER)
    # Many tokens with P_t = 0.3 exactly: the trusted fraction is Bernoulli(0.3) (5 sigma bound on 20,000 draws).
    B, T, V = 4, 5000, 2
    student = np.zeros((B, T, V))
    teacher = np.stack([np.full((B, T), np.log(0.3 * 0.5)), np.full((B, T), np.log(1 - 0.15))], -1)
    ones = np.ones((B, T), np.int32)
    v = viewer.token_view(
        jnp.asarray(student),
        jnp.asarray(teacher),
        jnp.zeros((B, T), jnp.int32),
        jnp.asarray(ones),
        jnp.zeros((B, T), jnp.int32),
        jax.random.key(2),
        k=2,
    )
    np.testing.assert_allclose(v.trust_probability, 0.3, atol=1e-5)
    assert abs(np.mean(v.region == viewer.TRUST) - 0.3) < 5 * np.sqrt(0.3 * 0.7 / (B * T))


class _Spans(html.parser.HTMLParser):
    """Collects (classes, data-tip, text) of every token span."""

    def __init__(self):
        super().__init__()
        self.spans, self._open = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == 'span' and 'tok' in attrs.get('class', '').split():
            self._open = [attrs['class'].split(), attrs.get('data-tip'), '']

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if tag == 'span' and self._open is not None:
            self.spans.append(tuple(self._open))
            self._open = None


def _views():
    student, teacher, tokens, response, prefix = _batch()
    v = viewer.token_view(
        *(jnp.asarray(x) for x in (student, teacher, tokens, response, prefix)), jax.random.key(3), k=4
    )
    alphabet = '0123456789+-<&\n='  # includes characters HTML must escape and a newline
    text = [[alphabet[t] for t in row] for row in tokens]
    return v, viewer.rollout_views(v, text, ['What is 2<3?'] * 3, ['right', '', 'wrong'])


def test_rollout_views_keep_response_tokens_only():
    v, views = _views()
    for b, view in enumerate(views):
        keep = v.region[b] != viewer.PROMPT
        assert len(view.tokens) == keep.sum() == len(view.region)
        np.testing.assert_array_equal(view.trust_probability, v.trust_probability[b][keep])


def test_render_html_has_one_span_per_token_with_its_statistics():
    _, views = _views()
    page = viewer.render_html(views, title='t<1>', note='a & b')
    parser = _Spans()
    parser.feed(page)
    flat = [(view, i) for view in views for i in range(len(view.tokens))]
    assert len(parser.spans) == len(flat)
    for (classes, tip, text), (view, i) in zip(parser.spans, flat):
        region = int(view.region[i])
        assert f'r{region}' in classes
        assert text == view.tokens[i].replace('\n', '\u21b5')  # the parser unescapes &lt; and &amp;
        assert f'P_t = {view.trust_probability[i]:.3f}' in tip
        assert f'= {view.reward[i]:+.3f}' in tip
        assert f'F_t (top-k FKL) = {view.fkl[i]:.3f}' in tip
        assert viewer.REGIONS[region][0] in tip
    assert 't&lt;1&gt;' in page and 'a &amp; b' in page
    for name, _, _ in viewer.REGIONS.values():
        assert name in page  # the legend
    assert page.count('class="rollout"') == 3
    # A newline token breaks the line after its span.
    assert page.count('<br>') == sum(t.endswith('\n') for view in views for t in view.tokens)


CHROMIUM = viewer.find_chromium()
# CI installs chromium and sets TROPD_REQUIRE_CHROMIUM=1, so there these tests fail rather than skip.
if CHROMIUM is None and os.environ.get('TROPD_REQUIRE_CHROMIUM'):
    raise RuntimeError('TROPD_REQUIRE_CHROMIUM is set but no chromium binary is on PATH')
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason='no chromium binary on PATH (apt-get install chromium)')


def _pixels_near(png, hex_colour, tol=0.06):
    from matplotlib import image

    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    picture = image.imread(png)[..., :3]
    return int(np.all(np.abs(picture - rgb) < tol, axis=-1).sum())


@pytest.mark.slow
@needs_chromium
def test_screenshot_in_headless_chromium_shows_every_region(tmp_path):
    _, views = _views()
    page = tmp_path / 'viewer.html'
    page.write_text(viewer.render_html(views))
    png = viewer.screenshot(str(page), str(tmp_path / 'viewer.png'), width=900)
    from matplotlib import image

    picture = image.imread(png)
    assert picture.shape[1] == 900
    assert 200 < picture.shape[0] < 2000  # the measured page height, not a fixed window
    for name, filled, unfilled in viewer.REGIONS.values():
        assert _pixels_near(png, filled) > 50, name
        assert _pixels_near(png, unfilled) > 20, name


@pytest.mark.slow
@needs_chromium
def test_browser_parses_the_tooltips(tmp_path):
    _, views = _views()
    page = tmp_path / 'viewer.html'
    page.write_text(viewer.render_html(views))
    dom = viewer._chromium(['--dump-dom', f'file://{page}'], None).stdout
    tips = re.findall(r'data-tip="([^"]*)"', dom)
    assert len(tips) == sum(len(v.tokens) for v in views)
    assert all('P_t = ' in t and 'r_t = ' in t and 'F_t' in t for t in tips)


@pytest.fixture
def tiny_pair(tmp_path, tiny_hf_checkpoint):
    from tropd_jax.tasks import arithmetic

    tokenizer = arithmetic.build_tokenizer()
    student, _ = tiny_hf_checkpoint(name='student', seed=0, vocab_size=105)
    teacher, _ = tiny_hf_checkpoint(name='teacher', seed=1, vocab_size=105, hidden_size=48)
    tokenizer.save_pretrained(student)
    data = tmp_path / 'data.jsonl'
    data.write_text(
        ''.join(
            json.dumps({'problem': p, 'answer': a}) + '\n' for p, a in [('1+2', '3'), ('4*5', '20'), ('(7-2)*3', '15')]
        )
    )
    return student, teacher, str(data), tokenizer


@pytest.mark.slow
def test_cli_scores_rollouts_like_transformers(tiny_pair, tmp_path):
    torch = pytest.importorskip('torch')
    import transformers

    from tropd_jax import data as data_lib

    student, teacher, data, tokenizer = tiny_pair
    out = tmp_path / 'out' / 'viewer.html'
    args = [
        f'--student={student}',
        f'--teacher={teacher}',
        f'--data={data}',
        '--num=3',
        f'--out={out}',
        '--prefix_lengths=0,4',
        '--max_new_tokens=12',
        '--k=8',
    ]
    viewer.main(args + (['--png'] if CHROMIUM is not None else []))
    if CHROMIUM is not None:
        assert (tmp_path / 'out' / 'viewer.png').is_file()
    rollouts = out.read_text().split('class="rollout"')[1:]
    assert len(rollouts) == 3

    # Independent check of the sampling layout, the shift and the scoring: transformers' log-probs of the same
    # sequences equal the s_t and tau_t the page shows (printed to 3 decimals).
    prompts = data_lib.load_prompts(data, tokenizer)[0]
    models = {
        name: transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        for name, path in (('student', student), ('teacher', teacher))
    }
    for row, (chunk, prompt) in enumerate(zip(rollouts, prompts)):
        parser = _Spans()
        parser.feed(chunk)
        regions = [int(next(c for c in classes if re.fullmatch(r'r\d', c))[1]) for classes, _, _ in parser.spans]
        prefix = sum(r == viewer.PREFIX for r in regions)
        assert regions[:prefix] == [viewer.PREFIX] * prefix  # the teacher prefix comes first
        assert prefix == 0 if row % 2 == 0 else 0 < prefix <= 4
        text = ''.join(t.replace('\u21b5', '\n') for _, _, t in parser.spans)
        response = tokenizer.encode(text, add_special_tokens=False)
        assert len(response) == len(parser.spans) > prefix
        ids = torch.tensor([list(prompt['prompt_tokens']) + response])
        shown = np.array(
            [[float(x) for x in re.search(r's_t = (\S+), tau_t = (\S+)', tip).groups()] for _, tip, _ in parser.spans]
        )
        for column, name in enumerate(('student', 'teacher')):
            with torch.no_grad():
                logits = models[name](ids).logits[0, :-1].double()
            reference = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].numpy()
            np.testing.assert_allclose(shown[:, column], reference[-len(response) :], atol=1.5e-3, err_msg=name)

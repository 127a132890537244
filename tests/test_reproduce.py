"""benchmarks/reproduce.py's report writer: the generated section is replaced, hand-written text never changes."""

import importlib.util
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def reproduce():
    spec = importlib.util.spec_from_file_location('reproduce', ROOT / 'benchmarks' / 'reproduce.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_section_is_created_then_replaced_and_hand_text_kept(reproduce, tmp_path):
    doc = tmp_path / 'docs' / 'results_tiny.md'
    reproduce.write_generated(doc, 'tiny', 'first table')
    assert doc.read_text().count('first table') == 1

    hand_before, hand_after = '# Results\n\nWritten by hand: why TrOPD loses here.\n\n', '\n\nMore hand text.\n'
    doc.write_text(hand_before + doc.read_text() + hand_after)
    reproduce.write_generated(doc, 'tiny', 'second table')
    reproduce.write_generated(doc, 'tiny_long', 'long-task table')  # another task: a section of its own
    reproduce.write_generated(doc, 'tiny', 'third table')
    text = doc.read_text()
    assert text.startswith(hand_before) and 'More hand text.\n' in text
    assert 'first table' not in text and 'second table' not in text
    assert text.count('third table') == 1 and text.count('long-task table') == 1
    assert text.index('third table') < text.index('More hand text.') < text.index('long-task table')


def test_a_file_without_markers_gets_the_section_appended(reproduce, tmp_path):
    doc = tmp_path / 'results.md'
    doc.write_text('# Hand-written results\n\nKeep me.\n')
    reproduce.write_generated(doc, 'tiny', 'table')
    text = doc.read_text()
    assert text.startswith('# Hand-written results\n\nKeep me.\n') and text.rstrip().endswith(
        '<!-- END GENERATED: tiny -->'
    )


def test_a_begin_marker_without_its_end_is_an_error_not_an_overwrite(reproduce, tmp_path):
    doc = tmp_path / 'results.md'
    reproduce.write_generated(doc, 'tiny', 'table')
    broken = doc.read_text().replace('<!-- END GENERATED: tiny -->', '') + 'hand text after\n'
    doc.write_text(broken)
    with pytest.raises(SystemExit, match='no matching'):
        reproduce.write_generated(doc, 'tiny', 'new table')
    assert doc.read_text() == broken


def test_claims_judge_by_the_seed_spread(reproduce):
    """Two methods whose means differ by more than their summed standard deviations: held / did not hold in bold;
    by less: "within seed spread"."""

    def runs(values, update):
        return [{'avg_at_k': v, 'greedy': v, 'pass_at_k': v, 'mean_update_norm': u} for v, u in zip(values, update)]

    by_method = {
        'tropd': runs([0.50, 0.52, 0.54], [1.0, 1.1, 1.2]),
        'opd': runs([0.30, 0.31, 0.32], [1.15, 1.25, 1.35]),  # 0.15 apart: more than one spread, less than two
    }
    lines = '\n'.join(reproduce.claims(by_method, {}, 8))
    assert 'TrOPD above opd (held-out avg@8): tropd 0.52 ± 0.02 vs opd 0.31 ± 0.01: **held**.' in lines
    mean_t, mean_o = np.mean([1.0, 1.1, 1.2]), np.mean([1.15, 1.25, 1.35])
    assert f'tropd {mean_t:.3g} ± 0.1 vs opd {mean_o:.3g} ± 0.1: held, within seed spread.' in lines

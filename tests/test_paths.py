"""Tests for the path layer (tropd_jax/paths.py): data, models, metrics and config checks on `gs://` as on a local
disk.

`gs://` is served by an in-memory fsspec file system registered under GCS's protocol names, so the code under test
takes the same route (etils.epath -> fsspec) it takes against a real bucket with gcsfs installed.
"""

import json
import os

import fsspec
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath
from flax import nnx
from fsspec.implementations.memory import MemoryFileSystem

from tropd_jax import config as config_lib
from tropd_jax import data, metrics, paths
from tropd_jax.models import Decoder, ModelConfig, from_pretrained, load_tokenizer, save_pretrained
from tropd_jax.tasks import arithmetic


class InMemoryGCS(MemoryFileSystem):
    """An in-memory bucket store answering `gs://` URLs."""

    protocol = ('gs', 'gcs')
    store = {}  # its own, not shared with fsspec's memory://
    pseudo_dirs = ['']

    def __init__(self, *args, finalize_on_close=False, **kwargs):  # gcsfs's argument, passed by etils
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        for prefix in ('gs://', 'gcs://'):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return '/' + path.lstrip('/').rstrip('/')


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """`gs://` backed by memory for this test; the remote-copy cache in `tmp_path`."""
    for protocol in InMemoryGCS.protocol:
        fsspec.register_implementation(protocol, InMemoryGCS, clobber=True)
    monkeypatch.setenv('TROPD_CACHE_DIR', str(tmp_path / 'cache'))
    InMemoryGCS.store.clear()
    InMemoryGCS.pseudo_dirs[:] = ['']
    fsspec.filesystem('gcs').invalidate_cache()
    yield InMemoryGCS.store
    InMemoryGCS.store.clear()


def upload(local, url):
    """Copies a local file or directory to `url`."""
    paths._copy(epath.Path(local), url)


def test_local_paths_pass_through(tmp_path):
    assert paths.is_local(str(tmp_path)) and not paths.is_local('gs://bucket/run')
    assert paths.join('gs://bucket/run', 'checkpoints', '3') == 'gs://bucket/run/checkpoints/3'
    assert paths.join(str(tmp_path), 'hf') == os.path.join(str(tmp_path), 'hf')
    assert paths.local_copy(str(tmp_path)) == str(tmp_path)  # never copied


def test_data_records_read_alike_from_gcs_and_local(gcs, tmp_path):
    local = tmp_path / 'data'
    local.mkdir()
    (local / 'a.jsonl').write_text('{"problem": "1+1", "answer": "2"}\n\nnot json\n{"problem": "2+2", "answer": "4"}\n')
    pq.write_table(pa.table({'problem': ['3+3', '4+4'], 'answer': ['6', '8']}), str(local / 'b.parquet'))
    (local / 'notes.txt').write_text('ignored')
    upload(local, 'gs://bucket/data')
    remote = data.read_records('gs://bucket/data')
    expected = [
        (location.replace(str(local), 'gs://bucket/data'), record) for location, record in data.read_records(str(local))
    ]
    assert remote == expected
    assert [r for _, r in remote][-1] == {'problem': '4+4', 'answer': '8'} and len(remote) == 5
    assert remote[1] == ('gs://bucket/data/a.jsonl:3', 'invalid JSON (Expecting value)')
    with pytest.raises(FileNotFoundError, match='gs://bucket/missing'):
        data.read_records('gs://bucket/missing')


def tiny_model():
    tokenizer = arithmetic.build_tokenizer()
    config = ModelConfig(
        architecture='qwen3',
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        qk_norm=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Decoder(config, rngs=nnx.Rngs(0)), tokenizer


def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_models_save_to_and_load_from_gcs(gcs, tmp_path):
    model, tokenizer = tiny_model()
    save_pretrained(model, 'gs://bucket/student', tokenizer)
    names = {epath.Path(p).name for p in epath.Path('gs://bucket/student').iterdir()}
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'generation_config.json'} <= names
    loaded, _ = from_pretrained('gs://bucket/student')
    for a, b in zip(params(loaded), params(model)):
        np.testing.assert_array_equal(a, b)
    assert load_tokenizer('gs://bucket/student').encode('1+2=3') == tokenizer.encode('1+2=3')
    # One local copy, reused: a second load reads the cache, not the bucket.
    (copy,) = os.listdir(tmp_path / 'cache')
    assert copy.endswith('-student') and paths.local_copy('gs://bucket/student') == str(tmp_path / 'cache' / copy)
    gcs.clear()
    reloaded, _ = from_pretrained('gs://bucket/student')
    np.testing.assert_array_equal(params(reloaded)[0], params(model)[0])


def test_metrics_rows_on_gcs_survive_a_resume(gcs):
    writer = metrics.MetricsWriter('gs://bucket/run', tensorboard=False)
    writer.write(1, {'loss': 0.5})
    writer.write(2, {'loss': 0.25})
    writer.close()
    resumed = metrics.MetricsWriter('gs://bucket/run', tensorboard=False)  # object stores cannot append
    resumed.write(2, {'loss': 0.125})
    resumed.write(3, {'loss': 0.0625})
    resumed.close()
    assert metrics.read_metrics('gs://bucket/run/metrics.jsonl') == [
        {'step': 1, 'loss': 0.5},
        {'step': 2, 'loss': 0.125},
        {'step': 3, 'loss': 0.0625},
    ]


def test_config_paths_are_checked_on_gcs(gcs, tmp_path):
    model, tokenizer = tiny_model()
    save_pretrained(model, 'gs://bucket/student', tokenizer)
    with epath.Path('gs://bucket/train.jsonl').open('w') as f:
        f.write(json.dumps({'problem': '1+1', 'answer': '2'}) + '\n')
    c = config_lib.default_config()
    c.model.student_path = c.model.teacher_path = 'gs://bucket/student'
    c.data.train_path = 'gs://bucket/train.jsonl'
    c.loss.k = 8
    config_lib.validate_config(c, num_devices=1)
    c.data.train_path = 'gs://bucket/other.jsonl'
    with pytest.raises(FileNotFoundError, match="data.train_path='gs://bucket/other.jsonl' does not exist"):
        config_lib.validate_config(c, num_devices=1)
    c.data.train_path = 'gs://bucket/train.jsonl'
    c.model.teacher_path = 'gs://bucket/teacher'
    with pytest.raises(FileNotFoundError, match='not a checkpoint directory'):
        config_lib.validate_config(c, num_devices=1)

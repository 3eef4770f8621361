"""The signed hash-chained transcript (docs/design.md section 6): every change is caught."""
import json

import pytest
from hypothesis import given, settings, strategies as st

import ginn_jax as ginn
from ginn_jax._src.trusted.transcript import TranscriptError, TranscriptWriter, public_key_hex
from ginn_jax._src.trusted.transcript import read_transcript

SEED = bytes(range(32))


def write(path, n=6):
  w = TranscriptWriter.create(path, {"public_key": public_key_hex(SEED), "model": "mlp"}, SEED)
  for t in range(n):
    w.record(ginn.TranscriptEntry(step=t, digest=f"{t:064x}", mac="ab" * 32, verified=t % 2 == 0,
                                  outcome="verified" if t % 2 == 0 else "unverified", loss=2.5 - t / 7,
                                  max_rel_l2=0.0 if t % 2 == 0 else None))
  w.append("close", {"step": n, "params_digest": "cd" * 32, "status": "complete"})
  w.close()
  return path.read_bytes()


def lines(data):
  return data.split(b"\n")[:-1]


def test_roundtrip_reads_every_record(tmp_path):
  data = write(tmp_path / "t.jsonl")
  recs = read_transcript(tmp_path / "t.jsonl", public_key=public_key_hex(SEED))
  assert [r.type for r in recs] == ["header"] + ["step"] * 6 + ["close"]
  assert [r.body.get("step") for r in recs[1:7]] == list(range(6))
  assert recs[3].body["loss"] == 2.5 - 2 / 7  # Floats round-trip exactly.
  assert all(json.loads(l)["sig"] for l in lines(data))


def test_wrong_public_key_is_refused(tmp_path):
  write(tmp_path / "t.jsonl")
  with pytest.raises(TranscriptError, match="entry 1.*public key"):
    read_transcript(tmp_path / "t.jsonl", public_key=public_key_hex(bytes(32)))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_bit_flip_is_caught_naming_the_entry(tmp_path_factory, data):
  path = tmp_path_factory.mktemp("flip") / "t.jsonl"
  raw = bytearray(write(path))
  pos = data.draw(st.integers(0, len(raw) - 1))
  raw[pos] ^= 1 << data.draw(st.integers(0, 7))
  path.write_bytes(bytes(raw))
  with pytest.raises(TranscriptError) as info:
    read_transcript(path)
  line = raw[:pos].count(b"\n") + 1
  assert info.value.entry == line and str(path) in str(info.value) and f"entry {line}" in str(info.value)


@pytest.mark.parametrize("edit", ["remove", "duplicate", "swap", "swap_steps", "remove_header"])
def test_removing_duplicating_or_reordering_is_caught(tmp_path, edit):
  path = tmp_path / "t.jsonl"
  ls = lines(write(path))
  if edit == "remove":
    del ls[3]
  elif edit == "duplicate":
    ls.insert(3, ls[3])
  elif edit == "swap":
    ls[2], ls[5] = ls[5], ls[2]
  elif edit == "swap_steps":
    ls[3], ls[4] = ls[4], ls[3]
  else:
    del ls[0]
  path.write_bytes(b"\n".join(ls) + b"\n")
  with pytest.raises(TranscriptError, match=r"entry \d"):
    read_transcript(path)


def test_signature_from_another_key_is_caught(tmp_path):
  """Re-chaining a forged record needs the private key: a recomputed hash with
  a signature by another key fails."""
  path = tmp_path / "t.jsonl"
  write(path, n=2)
  other = TranscriptWriter(path, bytes(32), seq=4, prev=read_transcript(path)[-1].hash)
  other.append("close", {"step": 2, "params_digest": "00" * 32, "status": "complete"})
  other.close()
  with pytest.raises(TranscriptError, match="entry 5.*signature"):
    read_transcript(path)


def test_torn_tail_only_tolerated_when_asked(tmp_path):
  path = tmp_path / "t.jsonl"
  data = write(path)
  path.write_bytes(data + b'{"body":{"ste')
  with pytest.raises(TranscriptError, match="torn"):
    read_transcript(path)
  assert len(read_transcript(path, allow_torn_tail=True)) == len(lines(data))


def test_create_refuses_an_existing_file(tmp_path):
  write(tmp_path / "t.jsonl")
  with pytest.raises(FileExistsError):
    TranscriptWriter.create(tmp_path / "t.jsonl", {"public_key": public_key_hex(SEED)}, SEED)

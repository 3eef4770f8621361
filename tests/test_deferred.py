"""Deferred (asynchronous) verification behaves like synchronous verification."""
import threading
import time

import pytest

import ginn_jax as ginn

from conftest import assert_coins_as_drawn, tree_bytes

SECRET = b"deferred-test-secret-0123456789ab"


def make(mlp, small_data, *, deferred, p=0.3, max_pending=4, secret=SECRET):
  cfg = ginn.ProtocolConfig(seed=5, batch_size=32, p=p, clip="elementwise", clip_value=0.01)
  return ginn.TrustedRuntime(mlp, *small_data, cfg, audit_secret=secret, deferred=deferred,
                             max_pending=max_pending)


def slow(runtime, seconds):
  """Wraps the runtime's re-computation so each check takes at least `seconds`."""
  inner = runtime.verifier._recompute

  def recompute(check):
    time.sleep(seconds)
    return inner(check)

  runtime.verifier._recompute = recompute


@pytest.mark.parametrize("start", [3, 11, 20])
def test_deferred_finds_the_same_violation_as_sync(mlp, small_data, start):
  # Caught within 200 steps at p = 0.3 but for probability 0.7^180 < 2^-90, whatever the digests.
  steps = {}
  for deferred in (False, True):
    rt = make(mlp, small_data, deferred=deferred)
    attacker = ginn.BackdoorWorker(mlp, *small_data, schedule=ginn.schedules.FromStep(start))
    with pytest.raises(ginn.IntegrityViolation) as info:
      ginn.train(rt, attacker, 200, progress=False)
    steps[deferred] = info.value.step
    assert not info.value.result.verified
    rt.close()
  assert steps[False] == steps[True] >= start


def test_honest_deferred_run_equals_sync_run(mlp, small_data):
  # 64 coins at p = 0.5: none drawn (the comparison below would be empty) has
  # probability 2^-64, whatever the digests.
  sync, deferred = make(mlp, small_data, deferred=False, p=0.5), make(mlp, small_data, deferred=True, p=0.5)
  w = ginn.HonestWorker(mlp, *small_data)
  a = ginn.train(sync, w, 64, progress=False)
  b = ginn.train(deferred, w, 64, progress=False)
  deferred.close()
  assert tree_bytes(a.params) == tree_bytes(b.params)
  assert a.verified and b.verified and a.num_verified == b.num_verified > 0
  assert_coins_as_drawn(SECRET, sync.config, a.transcript)
  assert_coins_as_drawn(SECRET, deferred.config, b.transcript)
  assert [e.digest for e in a.transcript if e.kind == "step"] == [
      e.digest for e in b.transcript if e.kind == "step"]
  pending = {e.step for e in b.transcript if e.outcome == "pending"}
  checked = {e.step for e in b.transcript if e.kind == "check" and e.outcome == "verified"}
  assert pending == checked == {e.step for e in a.transcript if e.verified}


def test_unchecked_model_is_never_returned_as_verified(mlp, small_data):
  rt = make(mlp, small_data, deferred=True, p=1.0, max_pending=8)
  slow(rt, 0.05)
  res = ginn.train(rt, ginn.HonestWorker(mlp, *small_data), 10, progress=False, finalize=False)
  assert res.num_pending > 0 and not res.verified
  res = ginn.train(rt, ginn.HonestWorker(mlp, *small_data), 0, progress=False)  # Finalizes.
  assert res.num_pending == 0 and res.verified and res.num_verified == 10
  rt.close()


def test_queue_stays_within_its_bound_under_a_slow_verifier(mlp, small_data):
  rt = make(mlp, small_data, deferred=True, p=1.0, max_pending=2)
  slow(rt, 0.03)
  inner = rt.verifier._recompute

  def first_waits_for_a_full_queue(check):
    # The first check holds the verifier until 2 more are queued behind it, so
    # the bound is reached however fast or busy the machine is (at most 60 s).
    deadline = time.monotonic() + 60
    while check.step == 0 and rt.verifier.pending < 3 and time.monotonic() < deadline:
      time.sleep(0.001)
    return inner(check)

  rt.verifier._recompute = first_waits_for_a_full_queue
  seen = []
  stop = threading.Event()

  def watch():
    while not stop.is_set():
      seen.append(rt.verifier.pending)
      time.sleep(0.002)

  watcher = threading.Thread(target=watch)
  watcher.start()
  res = ginn.train(rt, ginn.HonestWorker(mlp, *small_data), 25, progress=False)
  stop.set()
  watcher.join()
  rt.close()
  assert res.verified and res.num_verified == 25
  # Queue of 2 plus the one being re-computed, never more; and the bound was
  # reached (back-pressure happened).
  assert max(seen) <= 3 and rt.verifier.max_pending_seen == 3


def test_background_violation_stops_the_next_step(mlp, small_data):
  rt = make(mlp, small_data, deferred=True, p=1.0)
  attacker = ginn.BackdoorWorker(mlp, *small_data, schedule=ginn.schedules.Steps([4]))
  ginn.train(rt, ginn.HonestWorker(mlp, *small_data), 4, progress=False)
  rt.submit(attacker(rt.next_order()))  # Accepted for now: checked in the background.
  rt.verifier._queue.join()  # Wait until the check has run in the background...
  with pytest.raises(ginn.IntegrityViolation) as info:  # ...then the next step stops.
    rt.next_order()
  assert info.value.step == 4
  with pytest.raises(ginn.RuntimeHalted):
    rt.next_order()
  assert rt.transcript[-1].kind == "check" and rt.transcript[-1].outcome == "violation"
  rt.close()

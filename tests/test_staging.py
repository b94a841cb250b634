"""A batch stacked into kept host buffers and copied to the device (``edgecap.backends.staging``,
the torch backend on CUDA), here on the CPU: the stack is ``np.stack``'s, a buffer is kept per
thread and shape and written again only after its last upload has finished, an upload never
hands out the buffer itself, and a Captioner whose backend stages its batches captions as one
that does not."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from edgecap import Captioner, CaptionOptions  # noqa: E402
from edgecap.backends.staging import KEPT, Staging  # noqa: E402

CPU = torch.device("cpu")


def _images(rng, n: int, shape=(3, 8, 10), dtype=np.float32) -> list[np.ndarray]:
    if dtype == np.uint8:
        return [rng.integers(0, 256, shape, np.uint8) for _ in range(n)]
    return [rng.random(shape, np.float32) for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_the_stack_is_np_stack_s_and_the_upload_a_copy_of_it(dtype):
    rng = np.random.default_rng(0)
    staging = Staging(CPU)
    images = _images(rng, 3, dtype=dtype)
    stacked = staging.stack(images)
    np.testing.assert_array_equal(stacked.numpy(), np.stack(images))
    assert stacked.numpy().dtype == np.dtype(dtype)
    uploaded = staging.upload(stacked)
    assert uploaded.data_ptr() != stacked.data_ptr()
    # the next batch of that shape is written into the same buffer: the upload keeps its values
    again = staging.stack(_images(rng, 3, dtype=dtype))
    assert again.data_ptr() == stacked.data_ptr()
    np.testing.assert_array_equal(uploaded.numpy(), np.stack(images))


def test_a_buffer_is_kept_per_shape_the_last_two_a_thread_used():
    rng = np.random.default_rng(1)
    staging = Staging(CPU)
    assert KEPT == 2
    a = staging.stack(_images(rng, 2)).data_ptr()
    b = staging.stack(_images(rng, 4)).data_ptr()  # another batch size: another buffer
    frames = staging.stack(_images(rng, 2, (5, 6, 3), np.uint8)).data_ptr()  # a third shape: a dropped
    assert len({a, b, frames}) == 3
    assert staging.stack(_images(rng, 4)).data_ptr() == b  # kept (used second to last)
    assert staging.stack(_images(rng, 2, (5, 6, 3), np.uint8)).data_ptr() == frames
    assert len(staging._kept()) == 2 and (2, 3, 8, 10, "<f4") not in staging._kept()


def test_each_thread_stacks_into_buffers_of_its_own():
    """A thread-safe backend runs batches in several threads at once: two threads never write
    one buffer (each keeps its own, and each stack holds its own thread's images)."""
    staging = Staging(CPU)
    rng = np.random.default_rng(2)
    batches = [_images(rng, 4), _images(rng, 4)]
    barrier = threading.Barrier(2)
    got: dict[int, tuple[int, np.ndarray]] = {}

    def work(i: int) -> None:
        stacked = staging.stack(batches[i])
        barrier.wait()  # both stacked before either reads its stack back
        got[i] = (stacked.data_ptr(), staging.upload(stacked).numpy())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0][0] != got[1][0]
    for i in range(2):
        np.testing.assert_array_equal(got[i][1], np.stack(batches[i]))


class _Copy:
    """A copy to the device still running: its event's ``synchronize`` finishes it (reads the
    buffer, as the GPU's copy engine would) and says when that was."""

    def __init__(self, buffer: torch.Tensor, log: list):
        self.buffer, self.log, self.copied = buffer, log, None

    def synchronize(self) -> None:
        self.copied = self.buffer.numpy().copy()
        self.log.append("synchronize")


def test_a_buffer_is_written_again_only_after_its_last_upload_has_finished():
    """On CUDA an upload does not wait for its copy: the next stack of that shape waits for it
    (the upload's event) before it writes, so the copy reads the batch it was given."""
    rng = np.random.default_rng(3)
    staging = Staging(CPU)
    log: list = []
    copies: list[_Copy] = []

    def copy_started(host: torch.Tensor) -> _Copy:
        copies.append(_Copy(host, log))
        return copies[-1]

    staging._copy_started = copy_started  # what upload records on CUDA: a CUDA event
    first = _images(rng, 2)
    staging.upload(staging.stack(first))
    log.append("stacked again")
    staging.stack(_images(rng, 2))
    assert log == ["stacked again", "synchronize"]  # waited, inside the second stack
    np.testing.assert_array_equal(copies[0].copied, np.stack(first))
    staging.stack(_images(rng, 2))  # no upload since: nothing to wait for
    assert log == ["stacked again", "synchronize"]


def test_a_batch_over_the_limit_is_stacked_into_a_new_array_each_time(monkeypatch):
    """A batch larger than ``KEEP_AT_MOST`` bytes is not kept: a new array each time, nothing
    kept for it, its upload a copy all the same."""
    from edgecap.backends import staging as module

    rng = np.random.default_rng(6)
    images = _images(rng, 3)  # 3 x 3 x 8 x 10 float32: 2,880 bytes
    monkeypatch.setattr(module, "KEEP_AT_MOST", 2879)
    staging = Staging(CPU)
    first, second = staging.stack(images), staging.stack(images)
    assert first.data_ptr() != second.data_ptr() and len(staging._kept()) == 0
    np.testing.assert_array_equal(staging.upload(first).numpy(), np.stack(images))
    monkeypatch.setattr(module, "KEEP_AT_MOST", 2880)  # at the limit: kept
    assert staging.stack(images).data_ptr() == staging.stack(images).data_ptr()


def test_without_page_locked_memory_the_buffer_is_kept_pageable():
    """torch without a GPU has no page-locked memory (as a host short of it): the staging of a
    CUDA device keeps its buffers in pageable memory and stacks as before."""
    staging = Staging(torch.device("cuda"))
    assert staging.pinned
    images = _images(np.random.default_rng(4), 3)
    stacked = staging.stack(images)
    assert not stacked.is_pinned()
    np.testing.assert_array_equal(stacked.numpy(), np.stack(images))


def test_on_cuda_the_event_is_recorded_after_the_copy_on_the_stream_of_the_copy_s_gpu(monkeypatch):
    """What ``Staging`` asks of torch on CUDA, with torch's CUDA calls faked (a second GPU,
    ``cuda:1``, while the thread's current device is another): the buffer page-locked; the copy
    to ``cuda:1`` without blocking; then the event recorded on ``cuda:1``'s current stream, the
    stream the copy was queued on. A CUDA event completes when the work queued on its stream
    before ``record`` has (cudaEventRecord), so recorded before the copy or on another GPU's
    stream it would let the next stack overwrite the buffer while the copy still reads it."""
    log: list = []
    real_empty = torch.empty

    def empty(*shape, pin_memory=False, **kwargs):
        log.append(("empty", pin_memory))
        return real_empty(*shape, **kwargs)  # torch without a GPU has no page-locked memory

    def to(tensor, device=None, non_blocking=False):
        log.append(("copy", str(device), non_blocking))
        return tensor.clone()

    class Event:
        def record(self, stream):
            log.append(("record", stream))

        def synchronize(self):
            log.append("synchronize")

    def current_stream(device=None):
        return f"current stream of {'the current device' if device is None else device}"

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "to", to)  # before Staging binds its copy
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    staging = Staging(torch.device("cuda", 1))
    images = _images(np.random.default_rng(7), 2)
    uploaded = staging.upload(staging.stack(images))
    assert log == [
        ("empty", True),
        ("copy", "cuda:1", True),
        ("record", "current stream of cuda:1"),
    ]
    np.testing.assert_array_equal(uploaded.numpy(), np.stack(images))
    staging.stack(images)  # the same shape again: waits for that event first
    assert log[3:] == ["synchronize"]


def test_the_torch_backend_s_batch_input_is_the_upload_not_the_kept_buffer():
    """``TorchBackend.batch_input`` with a staging: the batch's copy (on the device on CUDA), never
    the kept buffer that the thread's next batch of that shape is written into; without one
    (the CPU), ``np.stack``'s array."""
    from types import SimpleNamespace

    from edgecap.backends.torch import TorchBackend

    rng = np.random.default_rng(8)
    images = _images(rng, 3)
    staging = Staging(CPU)
    got = TorchBackend.batch_input(SimpleNamespace(staging=staging), images)
    (buffer,) = (entry[0] for entry in staging._kept().values())
    assert got is not buffer and got.data_ptr() != buffer.data_ptr()
    np.testing.assert_array_equal(got.numpy(), np.stack(images))
    plain = TorchBackend.batch_input(SimpleNamespace(staging=None), images)
    assert isinstance(plain, np.ndarray)
    np.testing.assert_array_equal(plain, np.stack(images))


@pytest.mark.parametrize("preprocess", ["host", "device"])
def test_a_captioner_that_stages_its_batches_captions_as_one_that_does_not(
    default_model_dir, example_images, preprocess
):
    """The torch backend stages on CUDA only; given a staging on the CPU here, its batches go
    through the kept buffers (the same buffer call after call) with the same captions."""
    options = CaptionOptions(batch_size=4)
    plain = Captioner(
        default_model_dir, backend="torch", device="cpu", options=options, preprocess=preprocess
    )
    staged = Captioner(
        default_model_dir, backend="torch", device="cpu", options=options, preprocess=preprocess
    )
    assert plain.backend.staging is None  # on the CPU: np.stack, as before
    staging = staged.backend.staging = Staging(CPU)
    if preprocess == "device":
        staged.backend.frame_preprocess.staging = staging
    # frames of one size, as a camera's (the device path stacks the frames of each size)
    photos = [np.asarray(Image.open(p).convert("RGB").resize((400, 300))) for p in example_images]
    want = plain.caption_batch(photos)
    got = staged.caption_batch(photos)
    assert [c.text for c in got] == [c.text for c in want]
    assert [c.score for c in got] == [c.score for c in want]
    (buffer,) = (entry[0] for entry in staging._kept().values())
    pointer = buffer.data_ptr()
    assert [c.text for c in staged.caption_batch(photos)] == [c.text for c in want]
    assert [entry[0].data_ptr() for entry in staging._kept().values()] == [pointer]


@pytest.mark.gpu
def test_on_the_gpu_the_buffer_is_page_locked_and_the_copies_hold_each_batch():
    """On CUDA: the kept buffer is page-locked, an upload does not wait for its copy, and
    batch after batch through one buffer each copy on the GPU holds its own batch (the next
    stack waits for the copy before it writes)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    staging = Staging(torch.device("cuda", torch.cuda.current_device()))
    rng = np.random.default_rng(5)
    batches = [_images(rng, 64, (480, 640, 3), np.uint8) for _ in range(3)]
    uploads = []
    for images in batches:
        stacked = staging.stack(images)
        assert stacked.is_pinned()
        uploads.append(staging.upload(stacked))
    assert len(staging._kept()) == 1
    torch.cuda.synchronize()
    for images, uploaded in zip(batches, uploads):
        assert uploaded.is_cuda
        np.testing.assert_array_equal(uploaded.cpu().numpy(), np.stack(images))


@pytest.mark.gpu
def test_on_the_gpu_the_staged_captions_are_the_captions(default_model_dir, example_images):
    """The torch backend on CUDA stages its batches (the host's preprocessing into CUDA graphs,
    the frames preprocessed on the device without graphs: both ways into the encoder) and
    captions as the CPU does."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    photos = [np.asarray(Image.open(p).convert("RGB").resize((400, 300))) for p in example_images]
    want = [c.text for c in Captioner(default_model_dir, backend="torch", device="cpu").caption_batch(photos)]
    for preprocess, graphs in (("host", True), ("device", False)):
        cap = Captioner(
            default_model_dir, backend="torch", device="cuda", preprocess=preprocess, cuda_graphs=graphs
        )
        assert cap.backend.staging is not None
        for _ in range(2):  # the second batch through the kept buffer
            assert [c.text for c in cap.caption_batch(photos)] == want, (preprocess, graphs)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 9])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_a_large_stack_is_split_between_threads_and_is_np_stack_s(monkeypatch, n, dtype):
    """Over ``SPLIT_AT_LEAST`` bytes the stack is shared out in runs (here 3 threads, the
    runs uneven where n does not divide): the result is ``np.stack``'s, and another thread
    wrote part of it; under it, the calling thread alone."""
    from edgecap.backends import staging as module

    images = _images(np.random.default_rng(n), n, dtype=dtype)
    stackers: list[str] = []
    real = np.stack

    def recorded(arrays, *args, **kwargs):
        stackers.append(threading.current_thread().name)
        return real(arrays, *args, **kwargs)

    monkeypatch.setattr(module, "STACK_THREADS", 3)
    monkeypatch.setattr(module.np, "stack", recorded)
    monkeypatch.setattr(module, "SPLIT_AT_LEAST", images[0].nbytes * n)  # this batch: split
    out = np.empty((n, *images[0].shape), dtype)
    module.stack_into(images, out)
    np.testing.assert_array_equal(out, real(images))
    assert (
        len(stackers) == min(3, n)
        and sum(name.startswith("edgecap-stack") for name in stackers) == min(3, n) - 1
    )
    stackers.clear()
    monkeypatch.setattr(module, "SPLIT_AT_LEAST", images[0].nbytes * n + 1)  # one byte short
    module.stack_into(images, out)
    assert stackers == [threading.current_thread().name]


def test_a_split_stack_raises_a_bad_array_s_error(monkeypatch):
    from edgecap.backends import staging as module

    monkeypatch.setattr(module, "STACK_THREADS", 2)
    monkeypatch.setattr(module, "SPLIT_AT_LEAST", 0)
    images = _images(np.random.default_rng(0), 4)
    images[3] = images[3][:, :4]  # in the other thread's run
    with pytest.raises(ValueError, match="shape"):
        module.stack_into(images, np.empty((4, 3, 8, 10), np.float32))


def test_a_forked_child_stacks_with_threads_of_its_own(monkeypatch):
    """The pool of stacking threads made before a fork has no threads in the child, and its
    lock may be held there by a thread that is not: the child makes its own of both (it hung,
    waiting for the parent's threads, before it forgot them)."""
    import os
    import time

    from edgecap.backends import staging as module

    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    monkeypatch.setattr(module, "STACK_THREADS", 2)
    monkeypatch.setattr(module, "SPLIT_AT_LEAST", 0)
    images = _images(np.random.default_rng(0), 4)
    out = np.empty((4, 3, 8, 10), np.float32)
    module.stack_into(images, out)  # the pool made, its thread started
    module._pool_lock.acquire()  # held at the fork (another thread making the pool, say)
    pid = os.fork()
    if pid != 0:
        module._pool_lock.release()
    if pid == 0:  # the child: stack, and say whether it came out right
        try:
            module.stack_into(images, out)
            os._exit(0 if np.array_equal(out, np.stack(images)) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's stack never finished")


def test_a_split_stack_that_fails_in_its_first_run_has_written_the_others(monkeypatch):
    """The first run's bad array raises at once; the other thread's run, slower, is written
    before the error reaches the caller (nothing writes into the buffer afterwards)."""
    import time

    from edgecap.backends import staging as module

    class Slow:
        def __init__(self, value):
            self.value = value

        def __array__(self, dtype=None, copy=None):
            time.sleep(0.3)
            return self.value

    monkeypatch.setattr(module, "STACK_THREADS", 2)
    monkeypatch.setattr(module, "SPLIT_AT_LEAST", 0)
    good = np.ones((2, 3), np.float32)
    out = np.zeros((4, 2, 3), np.float32)
    with pytest.raises(ValueError):
        module.stack_into([np.ones((5, 5), np.float32), good, Slow(good), Slow(good)], out)
    assert (out[2:] == 1).all()


@pytest.mark.parametrize("taken", [0, 1], ids=["no run taken", "one run taken"])
def test_a_split_stack_whose_pool_takes_no_more_work_stacks_the_rest_itself(monkeypatch, taken):
    """The interpreter exiting: the pool refuses new work (``RuntimeError``) after ``taken``
    runs; the calling thread stacks every run left, so the whole batch is written."""
    from concurrent.futures import Future

    from edgecap.backends import staging as module

    class Exiting:
        def __init__(self):
            self.taken = 0

        def submit(self, fn, *args, **kwargs):
            if self.taken == taken:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            self.taken += 1
            done: Future = Future()
            done.set_result(fn(*args, **kwargs))
            return done

    monkeypatch.setattr(module, "STACK_THREADS", 3)
    monkeypatch.setattr(module, "SPLIT_AT_LEAST", 0)
    monkeypatch.setattr(module, "_stack_pool", Exiting)
    images = _images(np.random.default_rng(taken), 6)
    out = np.zeros((6, 3, 8, 10), np.float32)
    module.stack_into(images, out)
    np.testing.assert_array_equal(out, np.stack(images))


def test_a_batch_of_one_is_stacked_and_kept():
    rng = np.random.default_rng(3)
    staging = Staging(CPU)
    image = _images(rng, 1)
    stacked = staging.stack(image)
    np.testing.assert_array_equal(stacked.numpy(), image[0][None])
    assert staging.stack(_images(rng, 1)).data_ptr() == stacked.data_ptr()

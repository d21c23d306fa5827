"""Core reservations: a training waits while others hold the cores, and gets them when they end.

Each test uses its own lock folder, so that trainings running elsewhere on the machine neither
disturb the tests nor wait for them. Waits are bounded only by generous limits that matter
when something is broken; no assertion depends on how fast the machine is.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mnist_pipeline.cores import machine_cores, reserved_cores

LIMIT = 60  # seconds; reached only when a reservation is stuck


def enter_in_thread(count: int, folder, entered: threading.Event, leave: threading.Event) -> threading.Thread:
    def hold() -> None:
        with reserved_cores(count, folder):
            entered.set()
            leave.wait(LIMIT)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread


def wait_for_output(capsys: pytest.CaptureFixture, text: str) -> str:
    seen = ""
    deadline = time.monotonic() + LIMIT
    while text not in seen and time.monotonic() < deadline:
        seen += capsys.readouterr().out
        time.sleep(0.01)
    return seen


def test_a_reservation_waits_while_another_holds_every_core(tmp_path, capsys):
    first_in, first_out = threading.Event(), threading.Event()
    second_in, second_out = threading.Event(), threading.Event()
    first = enter_in_thread(machine_cores(), tmp_path, first_in, first_out)
    assert first_in.wait(LIMIT)
    second = enter_in_thread(1, tmp_path, second_in, second_out)
    said = wait_for_output(capsys, "waiting for 1 free CPU cores")
    assert f"other runs of the pipeline hold them (pid {os.getpid()} in {os.getcwd()})" in said
    assert not second_in.is_set()  # every core is still held
    first_out.set()
    assert second_in.wait(LIMIT)
    second_out.set()
    first.join(LIMIT)
    second.join(LIMIT)


def test_a_request_for_more_cores_than_the_machine_has_gets_them_all(tmp_path):
    entered, leave = threading.Event(), threading.Event()
    thread = enter_in_thread(machine_cores() + 3, tmp_path, entered, leave)
    assert entered.wait(LIMIT)
    leave.set()
    thread.join(LIMIT)


def test_the_cores_of_a_killed_process_are_free_again(tmp_path):
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from mnist_pipeline.cores import machine_cores, reserved_cores\n"
        "with reserved_cores(machine_cores(), Path(sys.argv[1])):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    entered, leave = threading.Event(), threading.Event()
    thread = enter_in_thread(machine_cores(), tmp_path, entered, leave)
    assert entered.wait(LIMIT)
    leave.set()
    thread.join(LIMIT)

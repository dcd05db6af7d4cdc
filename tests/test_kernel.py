"""The runner's kernel manager: IPC sockets (no 'Kernel is running over TCP without encryption' warning) and
no interrupt sent to the idle kernel at shutdown (jupyter_client 8 interrupts before every shutdown; ipykernel
may answer with an ERROR 'KeyboardInterrupt caught in kernel')."""
import asyncio
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager, KernelManager

from flowsan_lib.run.kernel import QuietKernelManager


async def _start_run_stop(manager_class):
    km = manager_class(kernel_name="python3")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        reply = await kc.execute_interactive("x = 1", timeout=60)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    return km


@pytest.mark.parametrize("manager_class, stock", [(QuietKernelManager, False), (AsyncKernelManager, True)])
def test_quiet_kernel_no_tcp_warning_no_interrupt_at_shutdown(capfd, monkeypatch, manager_class, stock):
    interrupts = []
    original = KernelManager._async_interrupt_kernel

    async def counting(self):
        interrupts.append(self.shutting_down)
        await original(self)
    monkeypatch.setattr(KernelManager, "_async_interrupt_kernel", counting)
    km = asyncio.run(_start_run_stop(manager_class))
    err = capfd.readouterr().err                        # the kernel process writes to our stderr
    assert ("without encryption" in err) == stock, err  # the stock manager shows the test can fail
    assert interrupts == ([True] if stock else []), interrupts
    if not stock:
        assert km.transport == "ipc" and not Path(km._ipc_dir).exists()   # socket folder removed with the kernel

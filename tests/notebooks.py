"""Run notebooks the way users' batch runs do: a real kernel through nbclient."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient


class RecordingClient(NotebookClient):
    """Keeps (cell index, message type, display id, mime types) of every output message, so
    a test sees what a live frontend was shown, not only what the saved notebook keeps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages = []

    def process_message(self, msg, cell, cell_index):
        content = msg["content"]
        display_id = content.get("transient", {}).get("display_id")
        self.messages.append((cell_index, msg["msg_type"], display_id, set(content.get("data", {}))))
        return super().process_message(msg, cell, cell_index)


def run_notebook(cells: list[str], store, ui: str = "static", timeout: int = 900, cwd=None, messages: list | None = None,
                 worker: str = "on") -> nbformat.NotebookNode:
    """Execute code cells in a fresh python3 kernel; a cell starting with a '# raises' line
    (removed before it runs) may fail. ``messages`` receives what ``RecordingClient`` kept.
    ``worker="off"`` trains in the kernel (for a test that patches the engines there)."""
    nb = nbformat.v4.new_notebook()
    for source in cells:
        raises = source.startswith("# raises\n")
        cell = nbformat.v4.new_code_cell(source.removeprefix("# raises\n"))
        if raises:
            cell.metadata["tags"] = ["raises-exception"]
        nb.cells.append(cell)
    env = {**os.environ, "NBCUSTOM_STORE": str(store), "NBCUSTOM_UI": ui, "HF_HUB_OFFLINE": "1", "NBCUSTOM_WORKER": worker}
    client = RecordingClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd or store.parent)}})
    client.km = client.kernel_manager_class(kernel_name="python3", env=env)  # the kernel sees env
    client.execute(env=env)
    if messages is not None:
        messages.extend(client.messages)
    return nb


def outputs_of(nb, index: int) -> list:
    return nb.cells[index].outputs


def mime_types(outputs) -> set[str]:
    return {mime for out in outputs for mime in out.get("data", {})}

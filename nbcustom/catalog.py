"""Store commands shared by ``%nbc`` and the ``nbcustom`` console command."""

from __future__ import annotations

import inspect
import shlex

from .display.render import Summary, metric_rows
from .errors import NbCustomError
from .store import Store, check_name, parse_ref, parse_version

USAGE = (
    "use: list | show NAME[@V] | versions NAME | activate NAME V | rm NAME[@V] | "
    "compare NAME V1 V2 | runs [NAME] | check [NAME] [--repair] | drift NAME[@V] [SQL] | export NAME[@V] --format F --to DIR | jobs | job NAME --every 10m ..."
)


def command(store: Store, line: str):
    """Run one store command; returns a DataFrame, a ``Summary`` or a message."""
    words = shlex.split(line)
    if not words:
        raise NbCustomError(f"%nbc needs a command: {USAGE}")
    verb, args = words[0], words[1:]
    handler = _COMMANDS.get(verb)
    if handler is None:
        raise NbCustomError(f"unknown %nbc command {verb!r}: {USAGE}")
    arity = handler.__code__.co_argcount - 1
    optional = len(handler.__defaults__ or ())
    most = len(args) if handler.__code__.co_flags & inspect.CO_VARARGS else arity
    if not arity - optional <= len(args) <= most:
        raise NbCustomError(f"%nbc {verb}: wrong number of arguments; use %nbc {usage(verb)}")
    return handler(store, *args)


def usage(verb: str) -> str:
    """The part of ``USAGE`` for one command, e.g. ``activate NAME V``."""
    return next(part for part in USAGE.removeprefix("use: ").split(" | ") if part.split()[0] == verb)


def known(store: Store, name: str) -> str:
    """``name``, if the store has such a model; else one line that says where to look."""
    if store.kind(check_name(name)) is None:
        have = [m["name"] for m in store.models()]
        listed = ", ".join(have[:8]) + (", ..." if len(have) > 8 else "") if have else "none yet"
        raise NbCustomError(f"unknown model {name!r}: see %nbc list (models: {listed})")
    return name


def list_models(store: Store):
    import pandas as pd

    return pd.DataFrame(store.models(), columns=["name", "kind", "active", "versions", "updated"])


def versions(store: Store, name: str):
    import pandas as pd

    rows = store.versions(name)
    if not rows:
        raise NbCustomError(f"unknown model {name!r}: see %nbc list")
    for row in rows:
        metrics = row.pop("metrics") or {}
        for key, value in (metrics.get("after") or {}).items():
            if isinstance(value, (int, float)):
                row[key] = value
    return pd.DataFrame(rows)


def show(store: Store, ref: str) -> Summary:
    name, version = parse_ref(ref)
    v = store.get(known(store, name), version)
    m = v.manifest
    facts = {
        "kind": m.get("kind"),
        "version": v.version,
        "active": v.version == store.active_version(name),
        "created": m.get("created"),
        **{k: m[k] for k in ("task", "base", "parent") if m.get(k) is not None},
        **m.get("counts", {}),
    }
    metrics = m.get("metrics", {})
    notes = [f"SQL: {m['sql'].strip()}"] if m.get("sql") else []
    files = m.get("files", {})
    size = sum((v.path / rel).stat().st_size for rel in files)
    notes.append(f"{len(files)} files, {_size(size)}, in {v.path}")
    charts = {p.stem: p.read_bytes() for p in sorted(v.path.glob("*.png"))}
    return Summary(f"{name}@{v.version}", metrics.get("before", {}), metrics.get("after", {}), facts=facts, notes=notes, charts=charts)


def _size(n: int) -> str:
    """Bytes as a short human figure: 980 B, 12.3 kB, 4.6 MB."""
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"


def activate(store: Store, name: str, version: str) -> str:
    store.activate(known(store, parse_ref(name)[0]), parse_version(version))
    return f"{name}: version {parse_version(version)} is active"


def remove(store: Store, ref: str) -> str:
    from .engines import release

    name, version = parse_ref(ref)
    if version is not None:  # an unknown version: one line that says where to look (a broken one stays removable)
        have = [row["version"] for row in store.versions(known(store, name))]
        if version not in have:
            raise NbCustomError(f"{name} has no version {version} (versions: {', '.join(map(str, have))}); see %nbc versions {name}")
    store.remove(name, version, on_remove=release)
    return f"removed {ref}"


def compare(store: Store, name: str, v1: str, v2: str):
    """Metrics of two versions side by side (each version's own 'after' metrics)."""
    import pandas as pd

    known(store, name)
    a, b = store.get(name, parse_version(v1), verify=False), store.get(name, parse_version(v2), verify=False)
    ma, mb = a.manifest.get("metrics", {}).get("after", {}), b.manifest.get("metrics", {}).get("after", {})
    rows = [{"metric": key, f"v{a.version}": x, f"v{b.version}": y, "delta": delta} for key, x, y, delta in metric_rows(ma, mb)]
    for key in ("read", "trained", "held_out"):
        ca, cb = a.manifest.get("counts", {}).get(key), b.manifest.get("counts", {}).get(key)
        if ca is not None or cb is not None:
            rows.append({"metric": f"rows {key}", f"v{a.version}": ca, f"v{b.version}": cb, "delta": None})
    return pd.DataFrame(rows, columns=["metric", f"v{a.version}", f"v{b.version}", "delta"])


def runs(store: Store, name: str | None = None):
    import pandas as pd

    return pd.DataFrame(store.runs(check_name(name) if name is not None else None))


def check(store: Store, *args: str):
    """check [NAME] [--repair]: what is wrong in the store, as a table (what --repair did in
    its last column); a line when nothing is."""
    import pandas as pd

    name, repair = check_args(args)
    findings = store.check(name, repair=repair)
    if not findings:
        if name is not None and not (store.root / name).is_dir():  # no folder and (no finding) no catalog row
            known(store, name)
        return no_problems(store, name)
    return pd.DataFrame([vars(f) for f in findings], columns=["problem", "what", "detail", "repaired"])


def check_args(args) -> tuple[str | None, bool]:
    names = [a for a in args if a != "--repair"]
    if len(names) > 1 or any(a.startswith("-") for a in names):
        raise NbCustomError(f"use check [NAME] [--repair], not check {' '.join(args)}")
    return (parse_ref(names[0])[0] if names else None), "--repair" in args


def no_problems(store: Store, name: str | None = None) -> str:
    versions = sum(m["versions"] for m in store.models() if name in (None, m["name"]))
    return f"no problems in {store.root}{f' for {name}' if name else ''}: {versions} version{'s' * (versions != 1)}, every checksum verified"


def export(store: Store, ref: str, *options: str) -> str:
    """export NAME[@V] --format merged|gguf|ollama|vllm|deployment|parquet --to DIR [--quant f16|q8_0] [--refit]"""
    from . import api, flags
    from .specs import ExportSpec

    args = flags.parse(flags.parser("nbc export", ExportSpec, positionals=()), shlex.join(options))
    args.pop("con", None)
    return "\n".join(api.export(ref, store=store, **args))


_COMMANDS = {
    "list": list_models,
    "show": show,
    "versions": versions,
    "activate": activate,
    "rm": remove,
    "compare": compare,
    "runs": runs,
    "check": check,
    "export": export,
}

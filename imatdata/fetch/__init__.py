"""`imatdata fetch`: URL lists in, raw Parquet shards out, every record exactly once.

The run, in order:
1. validate every source (streaming; nothing written on a bad file);
2. read what earlier runs finished: the raw shards and the journal (metadata columns only);
3. stream the records again; those without a result go to the network (`download`), their
   bodies to the image workers (`imagepool`, running `images`), and every outcome to an
   append-only journal of small Parquet files flushed every few hundred rows or second.
   On a machine of more than 4 cores, several such loops run, each a process with its own
   share of the records, request caps, image workers and journal files (`--loops`).
   Meanwhile a thread seals each full shard's worth of journal rows into a raw shard;
4. when every record has a row, settle `raw/<split>/` from shards + journal (the newest row
   per record wins; untouched shards stay as they are), drop the journal, write the summary
   and the class statistics.

A `kill -9` at any moment loses only the requests in flight and the rows not yet flushed:
rerunning the same command reads the journal back and continues. Memory stays flat in the
length of the list: records stream, tasks are bounded, per-record state is one 8-byte key in
sorted numpy arrays, and the bytes of the bodies held (downloading, queued for and inside
the image workers) are bounded by `--memory` (a `ByteBudget` per loop), not by a count.

Settling keeps exactly the records of this run's lists: rows of earlier runs that they do
not hold (another list under the same split, a smaller --limit) would go, so the run refuses
before touching anything unless `--prune` says to delete them.

The modules, in the order of a run:
  config     FetchOptions, NetConfig, parse_size: what a run is told (light: their fields are the flags)
  sources    input lists: formats, validation, record keys
  download   the network (aiohttp): caps, retries, address checks, the body budget
  images     image work as pure functions over bytes (Pillow)
  imagepool  the image worker processes
  loops      the run: rows, one event loop or several (`run_fetch`)
  store      raw shards + journal: index, resume, seal, settle
  report     counters, progress bar, summary

This package's own import is light on purpose: image worker processes and `imatdata.clean`
import `imagepool`/`images` through it and must not pay for aiohttp or the loops. The names
below are imported from their modules on first use.
"""

from __future__ import annotations

from imatdata.lazy import exports

# Public name -> where it is defined, imported on first use.
_EXPORTS = {
    "FetchOptions": "imatdata.fetch.config:FetchOptions",
    "NetConfig": "imatdata.fetch.config:NetConfig",
    "parse_size": "imatdata.fetch.config:parse_size",
    "run_fetch": "imatdata.fetch.loops:run_fetch",
    "default_loops": "imatdata.fetch.loops:default_loops",
    "base_row": "imatdata.fetch.loops:base_row",
    "_preload": "imatdata.fetch.loops:_preload",
    "FetchSummary": "imatdata.fetch.report:FetchSummary",
    "Counters": "imatdata.fetch.report:Counters",
    "render_summary": "imatdata.fetch.report:render_summary",
    "SUMMARY_NAME": "imatdata.fetch.report:SUMMARY_NAME",
    "JOURNAL_DIR": "imatdata.fetch.store:JOURNAL_DIR",
    "LOCK_NAME": "imatdata.fetch.store:LOCK_NAME",
    "is_transient": "imatdata.fetch.store:is_transient",
    "journal_dir": "imatdata.fetch.store:journal_dir",
    "journal_files": "imatdata.fetch.store:journal_files",
    "seal_journal": "imatdata.fetch.store:seal_journal",
    "finalize_split": "imatdata.fetch.store:finalize_split",
    "index_store": "imatdata.fetch.store:index_store",
    "done_keys": "imatdata.fetch.store:done_keys",
    "_write_journal_file": "imatdata.fetch.store:_write_journal_file",
}

__all__ = [name for name in _EXPORTS if not name.startswith("_")]
__getattr__, __dir__ = exports(globals(), _EXPORTS)

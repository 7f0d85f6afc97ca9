"""`imatdata stats`: what a manifest root holds, per split, per class, per tree node and per host.

Reads metadata columns only (never the image bytes) with pyarrow compute and numpy, so a
million rows take seconds. `write_stats` is what `fetch` and `clean` call when they finish.

Which rows count
----------------
*stage* is ``raw`` (``<root>/raw``) or ``clean`` (``<root>/clean``); by default ``clean`` when
``clean/`` holds shards, else ``raw``. A *usable* row is a row of the stage with status ``ok``
(in the clean stage: a kept row with status ok; failed test rows stay in ``clean/test``).
Class figures count usable rows with a label. Fetch outcomes (failure statuses, hosts) come
from ``raw/`` whenever it exists, also in the clean stage; without it, from the clean rows
plus ``clean/dropped.parquet``, where a ``fetch_failed`` drop counts as status ``fetch_failed``.

stats.json keys
---------------
- ``version`` (1), ``generated_at`` (ISO 8601, UTC), ``root``, ``stage``, ``min_count``
  (the threshold below which a class is called rare), ``fetch_source`` ("raw" or "clean").
- ``totals``: ``records``, ``rows``, ``ok``, ``failed``, ``dropped`` summed over splits.
- ``splits``: ``{split: {...}}`` with
  - ``records``: input records (raw: rows; clean: kept rows + dropped rows of the split);
  - ``rows``: rows in the stage's shards; ``ok``: rows with status ok (the usable rows);
  - ``labelled``: whether the split carries labels (test does not);
  - ``unlabelled_ok``: ok rows without a label (0 in a well-formed labelled split);
  - ``statuses``: ``{status: rows}`` of every fetch outcome; ``failed``: rows not ok;
    ``failures``: ``{status: rows}`` of the non-ok statuses only;
  - ``drops``: ``{reason: rows}`` from ``clean/dropped.parquet`` (null in the raw stage);
    ``dropped``: their sum (0 in the raw stage);
  - ``bytes``: ``stored`` (size of the split's shard files on disk), ``images`` (bytes of the
    image column as stored, from the Parquet footers), ``served`` (sum of ``orig_bytes`` of
    usable rows: what was downloaded);
  - ``sizes``: for ``width``, ``height`` (stored image), ``orig_width``, ``orig_height``,
    ``orig_bytes`` (as served) of usable rows: ``{"count", "min", "p5", "p25", "p50",
    "p75", "p95", "max", "mean"}`` (linear-interpolated percentiles), or null when none.
- ``classes``: ``num_classes`` (classes with at least one usable row in any split),
  ``per_split``: ``{split: {...}}`` for labelled splits, over classes with at least one usable
  row in that split: ``classes``, ``images``, ``min``, ``max``, ``median``, ``mean``,
  ``imbalance_ratio`` (max / min), ``below_min_count`` (classes under ``min_count``),
  ``most_frequent`` / ``least_frequent`` (``[{"class", "count"}]``, top N, ties by class id),
  ``missing_vs_train`` (train classes absent from this split; null when there is no train
  split), ``missing_vs_tree`` (tree leaves absent; null without a tree),
  ``unknown_to_tree`` (classes present but not in the tree; null without a tree).
- ``hierarchy``: null without ``--tree``; else ``tree`` (its source), ``leaves``, and
  ``level1`` / ``level2`` / ``level3``: ``{node path key: {"leaves", "counts": {split: usable
  images}, "classes_present": {split: classes with images}}}``; path keys join the names from
  level 1 down with "/" (``"level1_node4/level2_node5"``), since names repeat under parents.
- ``hosts``: ``hosts`` (distinct hosts), ``hosts_with_failures``, ``min_records`` (hosts with
  fewer rows are not ranked), ``top``: ``[{"host", "records", "failed", "failure_rate",
  "failures": {status: rows}}]``, worst failure rate first (ties: more failures first).
- ``files``: paths (relative to the root) of everything written under ``stats/``.

Other outputs under ``<root>/stats/``: ``class_counts.csv`` (``class,level1,level2,level3``
then one column per labelled split: usable rows of that class; every class seen in the stage,
its drops or the tree), ``class_counts.png``, ``image_sizes.png``, ``host_failures.png``.
"""

from __future__ import annotations

from imatdata.lazy import exports
from imatdata.stats.config import StatsOptions

# Everything else loads on first use: the CLI imports this package for StatsOptions on
# every start, and `compute` would add numpy and pyarrow to it.
_EXPORTS = {
    "NO_HOST": "imatdata.stats.compute:NO_HOST", "PERCENTILES": "imatdata.stats.compute:PERCENTILES",
    "SIZE_COLUMNS": "imatdata.stats.compute:SIZE_COLUMNS", "STAGES": "imatdata.stats.compute:STAGES",
    "StatsResult": "imatdata.stats.compute:StatsResult",
    "compute_stats": "imatdata.stats.compute:compute_stats", "dumps": "imatdata.stats.compute:dumps",
    "resolve_stage": "imatdata.stats.compute:resolve_stage",
    "write_outputs": "imatdata.stats.compute:write_outputs",
    "write_stats": "imatdata.stats.compute:write_stats",
    "render_stats": "imatdata.stats.render:render_stats",
}

__all__ = ["StatsOptions", "NO_HOST", "PERCENTILES", "SIZE_COLUMNS", "STAGES", "StatsResult", "compute_stats",
           "dumps", "render_stats", "resolve_stage", "write_outputs", "write_stats"]
__getattr__, __dir__ = exports(globals(), _EXPORTS)

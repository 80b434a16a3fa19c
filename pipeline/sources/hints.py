"""What to do about a store's labels or splits, said for the kind of source it came from (no imports: the probes and
kNN use these in their errors)."""

from __future__ import annotations

_HOW = {
    ("folder", "labels"): "put the images in class folders, ROOT/<class>/<image>",
    ("manifest", "labels"): "add a label column to the manifest",
    ("tar", "labels"): 'add KEY.cls (or KEY.json {"label": ...}) members, or put the members under class folders '
                       "(tar cf shard.tar classA classB)",
    ("torchvision", "labels"): "this dataset yields no targets; use a labelled dataset",
    ("folder", "splits"): "use ROOT/{train,val,test}/<class>/ folders, or class folders alone (a stratified split is "
                          "assigned), or extract with --split stratified",
    ("manifest", "splits"): "give every row a split (train/val/test), or drop the split column (a stratified split "
                            "is assigned), or extract with --split stratified",
    ("tar", "splits"): 'name shards train-*.tar / val-*.tar / test-*.tar or set "split" in KEY.json, for every '
                       "sample or none (a stratified split is assigned), or extract with --split stratified",
    ("torchvision", "splits"): "extract with --split stratified to split the dataset's images yourself",
}


def how_to(kind: str | None, need: str) -> str:
    """A hint for getting `need` ("labels" or "splits") from a source of this kind."""
    hint = _HOW.get((kind or "folder", need))
    if hint is None:
        hint = _HOW[("folder", need)]
    return hint

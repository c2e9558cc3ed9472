"""Stage prepare: load a source, apply its domain transforms, write train/val/test tensors with fingerprints.

python -m pipelines.prepare base        # the base dataset (data.base)
python -m pipelines.prepare DOMAIN      # one domain (data.domains.DOMAIN)
"""

import sys

from cdiff.data import DATASET, prepare_domain, save_imageset
from cdiff.errors import CdiffError
from cdiff.io import atomic_dir, write_json
from pipelines.core.config import params
from pipelines.core.console import stage, summary
from pipelines.core.layout import make_parents, paths


@stage
def main(name: str) -> None:
    p = params()
    domain = p.dataset(name)
    sets = prepare_domain(
        domain.source,
        domain.transforms,
        p.model.image_size,
        p.model.channels,
        p.data.root,
        p.data.download,
        p.data.val_fraction,
        p.seed,
        p.data.background,
    )
    if len(sets["train"].class_names) > p.model.num_classes:
        raise CdiffError(
            f"{domain.source} has {len(sets['train'].class_names)} classes; model.num_classes is {p.model.num_classes}"
        )
    folder = paths.prepared(domain.name)
    make_parents(folder)
    with atomic_dir(folder, DATASET, overwrite=True) as out:
        splits = {split: {"count": len(s), "fingerprint": save_imageset(s, out, split)} for split, s in sets.items()}
        write_json(
            out / "summary.json",
            {
                "format": DATASET.format,
                "source": domain.source,
                "transforms": domain.transforms,
                "class_names": sets["train"].class_names,
                "splits": splits,
            },
        )
    counts = ", ".join(f"{k} {v['count']}" for k, v in splits.items())
    summary(
        f"{domain.name} from {domain.source}", f"{len(sets['train'].class_names)} classes, {counts}", paths.show(folder)
    )


if __name__ == "__main__":
    main(sys.argv[1])

"""Stage index: the images a dataset's source reads from data/images, with their sha256, in one small file.

python -m pipelines.index_images base     # the base dataset (data.base)
python -m pipelines.index_images DOMAIN   # one domain (data.domains.DOMAIN)

Every index stage depends on all of data/images (seconds to hash), and each prepare stage on its own
dataset's index (data/image_index/NAME.json) alone: a change to one domain's images rewrites that domain's
index, and the others come out byte for byte the same, so DVC reruns that domain's prepare stage and
nothing else. A built-in source reads nothing from data/images: its index lists no files.
"""

import sys

from cdiff.data import source_files
from cdiff.io import write_json
from pipelines.core.config import params
from pipelines.core.console import stage, summary
from pipelines.core.layout import make_parents, paths


@stage
def main(name: str) -> None:
    p = params()
    domain = p.dataset(name)
    files = source_files(domain.source)
    index = paths.image_index(domain.name)
    make_parents(index)
    write_json(index, {"source": domain.source, "files": files})
    read = f"{len(files)} images from {paths.show(paths.images)}" if files else "a built-in source, no image files"
    summary(f"{domain.name} from {domain.source}", read, paths.show(index))


if __name__ == "__main__":
    main(sys.argv[1])

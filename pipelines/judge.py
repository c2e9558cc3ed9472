"""Stage judge_base / judge@DOMAIN: train the dataset's judge classifier on its real train split.

Its test accuracy is the ceiling for GAN-test accuracy; its features are the FID space.
python -m pipelines.judge base | DOMAIN
"""

import sys

from cdiff import results
from cdiff.data import load_imageset
from cdiff.judge import predict, save_judge, train_judge
from cdiff.metrics import class_accuracy
from cdiff.names import safe_names
from pipelines.core import tracking
from pipelines.core.config import params
from pipelines.core.console import stage, summary
from pipelines.core.layout import make_parents, paths


@stage
def main(name: str) -> None:
    p = params()
    dataset = p.dataset(name).name
    folder = paths.prepared(dataset)
    train_set, test_set = load_imageset(folder, "train"), load_imageset(folder, "test")
    metrics = paths.judge_metrics(dataset)
    make_parents(paths.judge(dataset), metrics, paths.per_class(metrics))
    with tracking.stage_run(p, "judge", dataset):
        judge = train_judge(train_set, p.judge, seed=p.seed)
        accuracy = class_accuracy(predict(judge, test_set.as_float())[1], test_set.labels, test_set.class_names)
        save_judge(judge, train_set.class_names, paths.judge(dataset), overwrite=True)
        result = results.JudgeResult(accuracy.accuracy, len(test_set))
        keys = dict(zip(test_set.class_names, safe_names(test_set.class_names), strict=True))
        per_class = results.PerClass({"judge": {keys[k]: v for k, v in accuracy.per_class.items()}})
        results.save(metrics, result)
        results.save(paths.per_class(metrics), per_class)
        tracking.log_result(result)
        tracking.log_result(per_class)
    accuracy_line = f"real test accuracy {result.test_accuracy:.4f} on {result.test_images} images"
    summary(f"judge for {dataset}", accuracy_line, paths.show(paths.judge(dataset)))


if __name__ == "__main__":
    main(sys.argv[1])

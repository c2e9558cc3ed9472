"""Stage judge_base / judge@DOMAIN: train the dataset's judge classifier on its real train split.

Its test accuracy is the ceiling for GAN-test accuracy; its features are the FID space.
python -m pipelines.judge base | DOMAIN
"""

import sys

import mlflow

from cdiff.data import load_imageset
from cdiff.io import write_json
from cdiff.judge import predict, save_judge, train_judge
from cdiff.metrics import class_accuracy
from cdiff.names import safe_names
from pipelines import tracking
from pipelines.common import Paths, dataset_name, mkdirs, params, stage


@stage
def main(name: str) -> None:
    p = params()
    dataset = dataset_name(p, name)
    folder = Paths.prepared / dataset
    train_set, test_set = load_imageset(folder, "train"), load_imageset(folder, "test")
    with tracking.stage_run(p, "judge", dataset):
        judge = train_judge(train_set, p.judge, seed=p.seed)
        accuracy = class_accuracy(predict(judge, test_set.as_float())[1], test_set.labels, test_set.class_names)
        mkdirs(Paths.judges, Paths.metrics)
        extra = {"test_accuracy": accuracy["accuracy"]}
        save_judge(judge, train_set.class_names, Paths.judges / dataset, extra=extra, overwrite=True)
        keys = dict(zip(test_set.class_names, safe_names(test_set.class_names), strict=True))
        per_class = {keys[k]: v for k, v in accuracy["per_class"].items()}
        mlflow.log_metrics(
            {"test_accuracy": accuracy["accuracy"], **{f"test_accuracy.{k}": v for k, v in per_class.items()}}
        )
        write_json(
            Paths.metrics / f"judge-{dataset}.json", {"test_accuracy": accuracy["accuracy"], "per_class": per_class}
        )
    print(f"judge {dataset}: test accuracy {accuracy['accuracy']:.4f} on {len(test_set)} real test images")


if __name__ == "__main__":
    main(sys.argv[1])

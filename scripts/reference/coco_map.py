"""COCO's mAP (pycocotools' COCOeval, boxes) of detections against ground truth, for the test that
checks ringtrain::detect::mean_ap. Reads JSON from argv[1]: a list of images, each
{"gts": [[x1, y1, x2, y2, class], ...], "dets": [[x1, y1, x2, y2, score, class], ...]}; prints
{"map": mAP@[.5:.95], "map50": mAP@0.5} as JSON."""
import contextlib, io, json, sys

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

images = json.load(open(sys.argv[1]))
classes = sorted({int(g[4]) for im in images for g in im["gts"]} | {int(d[5]) for im in images for d in im["dets"]})
gt = {"images": [{"id": i} for i in range(len(images))], "categories": [{"id": c} for c in classes], "annotations": []}
dets = []
for i, im in enumerate(images):
    for x1, y1, x2, y2, c in im["gts"]:
        w, h = x2 - x1, y2 - y1
        gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": int(c),
                                  "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
    for x1, y1, x2, y2, s, c in im["dets"]:
        dets.append({"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
print(json.dumps({"map": ev.stats[0], "map50": ev.stats[1]}))

import numpy as np

from hiad_runtime.geometry import Tiling
from hiad_runtime.tasks import task_of_tile
from hiad_train.tasks import all_to_one, neighborhood, one_to_one, print_tasks
from hiad_train.visualize import task_map


def grid(tasks, tiling):
    owner = task_of_tile(tasks, tiling)
    return [[owner[r * tiling.cols + c] for c in range(tiling.cols)] for r in range(tiling.rows)]


TILING = Tiling.create(2048, 512)


def test_a2o_and_o2o():
    assert (
        print_tasks(all_to_one(TILING), TILING).splitlines()[0] == "Row: 4, Column: 4, Patch Number: 16, Task Number: 1"
    )
    o2o = one_to_one(TILING)
    assert [t.tiles for t in o2o] == [(i,) for i in range(16)]
    assert grid(o2o, TILING)[3][3] == "task_15"


def test_neighborhood_matches_hiad_tutorial():
    n = [int(x[5:]) for row in grid(neighborhood(TILING, 2, 2), TILING) for x in row]
    assert n == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    n = [int(x[5:]) for row in grid(neighborhood(TILING, 3, 1), TILING) for x in row]
    assert n == [0, 0, 1, 2] * 4
    text = print_tasks(neighborhood(TILING, 2), TILING)
    assert text.splitlines()[1].split("|")[1:5] == ["  task_0  ", "  task_0  ", "  task_1  ", "  task_1  "]


def test_task_map_picture_tints_tiles():
    image = np.zeros((2048, 2048, 3), np.uint8)
    pic = task_map(neighborhood(TILING, 2), TILING, image)
    assert pic.shape == image.shape
    assert not np.array_equal(pic[100, 100], pic[100, 1900])  # two tasks, two colours

import pandas as pd
import pytest

from common.assets import AssetError
from common.data import load_movielens
from tests.conftest import write_atomic, write_grouplens_1m, write_grouplens_100k

WRITERS = {"grouplens-100k": write_grouplens_100k, "grouplens-1m": write_grouplens_1m, "recbole": write_atomic}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_format_loads_the_same_data(fmt, tmp_path, raw_data):
    ratings, items, users = raw_data
    data = load_movielens(WRITERS[fmt](tmp_path / "ds", ratings, items, users))

    got = data.ratings.sort_values(["user", "item"]).reset_index(drop=True)
    want = ratings.sort_values(["user", "item"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want.astype({"rating": "float64"}), check_dtype=False)
    assert data.items.loc[3, "title"] == "Movie 3"
    assert data.items.loc[5, "title"] == "The Classic 5"  # MovieLens' trailing article moved to the front
    assert data.items.loc[3, "year"] == items.loc[2, "year"]
    assert set(data.items.loc[3, "genres"]) == set(items.loc[2, "genres"])
    assert data.users.loc[1, "occupation"] == "writer"  # ML-1M stores it as code 20
    assert data.users.loc[2, "age"] == 21 and data.users.loc[2, "gender"] == "M"


def test_unknown_dataset_name_is_a_clear_error():
    with pytest.raises(AssetError, match="unknown dataset"):
        load_movielens("ml-42m")


def test_directory_without_movielens_files(tmp_path):
    with pytest.raises(AssetError, match="no MovieLens files"):
        load_movielens(tmp_path)


def test_corrupt_ratings_file(tmp_path, raw_data):
    root = write_grouplens_100k(tmp_path / "ds", *raw_data)
    (root / "u.data").write_text("1\tnot-an-item\t5\t880000000\n")
    with pytest.raises(AssetError, match="malformed ratings"):
        load_movielens(root)


def test_missing_metadata_file(tmp_path, raw_data):
    root = write_grouplens_1m(tmp_path / "ds", *raw_data)
    (root / "movies.dat").unlink()
    with pytest.raises(AssetError, match="missing data file"):
        load_movielens(root)


def test_out_of_range_rating(tmp_path, raw_data):
    ratings, items, users = raw_data
    ratings = ratings.copy()
    ratings.loc[0, "rating"] = 7
    with pytest.raises(AssetError, match="outside 1..5"):
        load_movielens(write_grouplens_100k(tmp_path / "ds", ratings, items, users))

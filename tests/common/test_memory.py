import pandas as pd

from common.memory import catalogue_embeddings, memory_text, recall

ITEMS = pd.DataFrame({
    "title": ["Alien", "Aliens", "Toy Story", "Clueless", "Toy Story 2", "Heat"],
    "year": pd.array([1979, 1986, 1995, 1995, 1999, 1995], dtype="Int64"),
    "genres": [("Horror", "Sci-Fi"), ("Action", "Sci-Fi"), ("Animation", "Children's", "Comedy"), ("Comedy",),
               ("Animation", "Children's", "Comedy"), ("Action", "Crime")],
}, index=pd.Index([1, 2, 3, 4, 5, 6], name="item"))


def test_recall_returns_the_most_similar_past_ratings_never_the_movie_itself():
    emb = catalogue_embeddings(ITEMS)
    history = pd.DataFrame({"item": [3, 1, 4, 6, 2], "rating": [5.0, 2.0, 4.0, 3.0, 1.0]})
    recalled = recall(5, history, emb, 2)  # Toy Story 2
    assert list(recalled["item"])[0] == 3 and len(recalled) == 2
    assert list(recall(1, history, emb, 1)["item"]) == [2]  # Alien -> Aliens, not Alien itself
    assert 1 not in set(recall(1, history, emb, 10)["item"]) and len(recall(1, history, emb, 10)) == 4
    assert recall(1, history, emb, 0).empty and recall(1, history.iloc[:0], emb, 3).empty


def test_memory_text_quotes_titles_and_ratings():
    recalled = pd.DataFrame({"item": [3, 1], "rating": [5.0, 2.0]})
    assert memory_text(recalled, ITEMS) == "Similar movies they rated: Toy Story (1995): 5/5; Alien (1979): 2/5."
    assert memory_text(recalled.iloc[:0], ITEMS) == ""


def test_catalogue_embeddings_are_unit_vectors_per_item_and_reused():
    emb = catalogue_embeddings(ITEMS)
    assert list(emb.index) == list(ITEMS.index)
    assert all(abs(float((v ** 2).sum()) - 1.0) < 1e-4 for v in emb)
    assert catalogue_embeddings(ITEMS.copy()) is emb  # same content: not embedded again

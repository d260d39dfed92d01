"""Downstream task models trained on the representation of one batch.

future_listening: multi-label head over the top-K artists; artist_preference: (user, artist)
binary classifier; similar_users: FAISS nearest neighbours in embedding space.
"""

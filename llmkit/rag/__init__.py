"""Retrieval-augmented generation: a hybrid index (`index`), passages from packaged corpora (`corpus`)
and grounded answers with citations (`ask`)."""

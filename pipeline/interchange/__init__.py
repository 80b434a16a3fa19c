"""Features in and out of other tools' formats: `export` (the clip-retrieval/autofaiss layout, one Parquet dataset,
the ann-benchmarks HDF5 layout), `import` (npy + Parquet, or Parquet with an embedding column, into a store) and
`FeatureEncoder`, a scikit-learn transformer whose cache is a store."""

"""Development tools that are not the product: throwaway daemons and clusters for tests, the
demo and benchmarks. Nothing in the product imports this package, and the frozen program
leaves it out."""

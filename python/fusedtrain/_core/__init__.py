"""What every family shares: backend choice (`backend`), argument checks (`checks`), dtypes
(`dtypes`) and the op-registration helper (`registry`). Imports torch only, never a family."""

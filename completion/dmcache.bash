# bash completion for dmcache(1): commands, their options, and the project names of the
# snapshots the caller may see (`dmcache ls --json`, which never contacts a server).

_dmcache_projects()
{
	local sock=()
	[[ -n $1 ]] && sock=(--socket "$1")
	dmcache "${sock[@]}" ls --json 2>/dev/null |
		sed -n 's/^ *"project_name": "\(.*\)",\{0,1\}$/\1/p' | sort -u
}

_dmcache()
{
	local cur prev words cword
	if declare -F _init_completion >/dev/null; then
		_init_completion || return
	else
		cur=${COMP_WORDS[COMP_CWORD]}
		prev=${COMP_WORDS[COMP_CWORD - 1]}
		words=("${COMP_WORDS[@]}")
		cword=$COMP_CWORD
	fi

	local commands="status ping prefetch ls evict verify get metrics tier"
	local i cmd= socket=
	for ((i = 1; i < cword; i++)); do
		case ${words[i]} in
		-s | --socket) socket=${words[i + 1]}; ((i++)) ;;
		-*) ;;
		*) cmd=${words[i]}; break ;;
		esac
	done

	if [[ -z $cmd ]]; then
		case $prev in
		-s | --socket)
			COMPREPLY=($(compgen -f -- "$cur"))
			return ;;
		esac
		if [[ $cur == -* ]]; then
			COMPREPLY=($(compgen -W "--socket --version --help" -- "$cur"))
		else
			COMPREPLY=($(compgen -W "$commands" -- "$cur"))
		fi
		return
	fi

	local opts=
	case $cmd in
	status) opts="--json --help" ;;
	ls) opts="--json --offline --help" ;;
	ping | verify) opts="--json --help" ;;
	prefetch) opts="--version --server --api-key --source --json --offline --allow-partial --decode --shard --to-tier --cancel --help" ;;
	evict) opts="--all --json --help" ;;
	get) opts="--output --meta --version --server --api-key --lut --dtype --source --offline --json --size --resize --crop --pad --pad-value --channels --window --help" ;;
	metrics) opts="--output --help" ;;
	tier) opts="--json --dry-run --repair --help" ;;
	esac

	case $prev in
	--source | -o | --output | --meta)
		COMPREPLY=($(compgen -f -- "$cur"))
		return ;;
	--dtype)
		COMPREPLY=($(compgen -W "uint8 int8 uint16 int16 uint32 int32 float32 float64" -- "$cur"))
		return ;;
	--resize)
		COMPREPLY=($(compgen -W "bilinear area nearest" -- "$cur"))
		return ;;
	--version | --server | --api-key | --size | --crop | --pad | --pad-value | --channels | --window)
		return ;;
	esac
	if [[ $cur == -* ]]; then
		COMPREPLY=($(compgen -W "$opts" -- "$cur"))
		return
	fi
	case $cmd in
	prefetch | evict | get)
		local IFS=$'\n'
		COMPREPLY=($(compgen -W "$(_dmcache_projects "$socket")" -- "$cur"))
		;;
	tier)
		[[ ${words[cword - 1]} == tier ]] && COMPREPLY=($(compgen -W "ls verify gc" -- "$cur"))
		;;
	esac
}

complete -F _dmcache dmcache

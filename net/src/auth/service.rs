//! The `etcdserverpb.Auth` gRPC service (etcd's v3rpc `AuthServer`). Management calls need
//! the root role once auth is enabled (etcd's `needAdminPermission`); UserGet and RoleGet are
//! also open to the user asking about itself or one of its roles. Changes go through the
//! meta group (`ops.rs`); answers are read from the node's auth state.

use super::ops::request;
use super::state::{AdminOp, PERM_READWRITE, ROOT_ROLE};
use super::{hash_password, verify_password, AuthError, Caller};
use crate::node::errors::KvError;
use crate::node::{Node, Shared};
use ferrocd_api::authpb::Permission;
use ferrocd_api::etcdserverpb::auth_server::Auth;
use ferrocd_api::etcdserverpb::*;
use ferrocd_engine::mvcc::codec::AuthPermission;
use std::sync::Arc;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct AuthService {
    node: Node,
}

impl AuthService {
    pub fn new(node: Node) -> AuthService {
        AuthService { node }
    }

    fn shared(&self) -> &Arc<Shared> {
        self.node.shared()
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(self.shared().current_header())
    }

    /// Checks that the caller may manage auth, then runs `op` in the meta group.
    async fn manage<T>(&self, request: &Request<T>, op: AdminOp) -> Result<(), Status> {
        self.shared().auth.admin(request.metadata())?;
        request_op(self.shared(), op).await
    }

    /// The caller of a read that is open to root and to `allowed(user)` (etcd's UserGet and
    /// RoleGet rule).
    fn may_read<T>(
        &self,
        request: &Request<T>,
        allowed: impl FnOnce(&str) -> bool,
    ) -> Result<(), AuthError> {
        let auth = &self.shared().auth;
        let caller = auth.caller(request.metadata())?;
        match (auth.check_admin(&caller), &caller) {
            (Ok(()), _) => Ok(()),
            (Err(_), Caller::User(info)) if allowed(&info.user) => Ok(()),
            (Err(e), _) => Err(e),
        }
    }
}

/// etcd's CheckPassword then token assignment: an unknown user and a wrong password are the
/// same "authentication failed". On a follower the leader checks and issues the token.
pub(crate) async fn authenticate(
    shared: &Shared,
    r: AuthenticateRequest,
) -> Result<AuthenticateResponse, KvError> {
    let auth = &shared.auth;
    if !auth.is_enabled() {
        return Err(AuthError::AuthNotEnabled.into());
    }
    if let Some(leader) = shared.role.remote_leader()? {
        return crate::forward::authenticate(shared, leader, r).await;
    }
    let hash = match auth.state().user(&r.name) {
        Err(_) => return Err(AuthError::AuthFailed.into()),
        Ok(user) => user.password_hash.clone(),
    };
    let hash = hash.ok_or(AuthError::NoPasswordUser)?;
    if !verify_password(r.password, hash).await {
        return Err(AuthError::AuthFailed.into());
    }
    let token = auth.issue_token(&r.name)?;
    if shared.role.is_clustered() && auth.tokens_are_local() {
        // Every member accepts it once committed (etcd replicates simple tokens too), so a
        // client may use it on any endpoint.
        let (user, token) = (r.name, token.clone());
        request(shared, AdminOp::IssueToken { user, token }).await?;
    }
    Ok(AuthenticateResponse {
        header: Some(shared.current_header()),
        token,
    })
}

async fn request_op(shared: &Shared, op: AdminOp) -> Result<(), Status> {
    Ok(request(shared, op).await?)
}

/// The permission as the meta log stores it; a type beyond READWRITE is refused.
fn stored_perm(perm: Option<Permission>) -> Result<AuthPermission, Status> {
    let perm = perm.unwrap_or_default();
    let perm_type = u8::try_from(perm.perm_type)
        .ok()
        .filter(|t| *t <= PERM_READWRITE)
        .ok_or_else(|| Status::invalid_argument("invalid permission type"))?;
    Ok(AuthPermission {
        perm_type,
        key: perm.key,
        range_end: perm.range_end,
    })
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        self.manage(&request, AdminOp::Enable).await?;
        Ok(Response::new(AuthEnableResponse {
            header: self.header(),
        }))
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        self.manage(&request, AdminOp::Disable).await?;
        Ok(Response::new(AuthDisableResponse {
            header: self.header(),
        }))
    }

    async fn auth_status(
        &self,
        _request: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        let state = self.shared().auth.state();
        let (enabled, auth_revision) = (state.enabled, state.revision);
        drop(state);
        Ok(Response::new(AuthStatusResponse {
            header: self.header(),
            enabled,
            auth_revision,
        }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let response = authenticate(self.shared(), request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn user_add(
        &self,
        request: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        self.shared().auth.admin(request.metadata())?;
        let r = request.get_ref();
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        let password_hash = match no_password {
            true => None,
            false => Some(hash_password(r.password.clone()).await),
        };
        let op = AdminOp::UserAdd {
            name: r.name.clone(),
            password_hash,
        };
        request_op(self.shared(), op).await?;
        Ok(Response::new(AuthUserAddResponse {
            header: self.header(),
        }))
    }

    async fn user_get(
        &self,
        request: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let name = &request.get_ref().name;
        self.may_read(&request, |user| user == name)?;
        let roles = self.shared().auth.state().user(name)?.roles.clone();
        Ok(Response::new(AuthUserGetResponse {
            header: self.header(),
            roles,
        }))
    }

    async fn user_list(
        &self,
        request: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        self.shared().auth.admin(request.metadata())?;
        let users = self.shared().auth.state().user_names();
        Ok(Response::new(AuthUserListResponse {
            header: self.header(),
            users,
        }))
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let name = request.get_ref().name.clone();
        self.manage(&request, AdminOp::UserDelete { name }).await?;
        Ok(Response::new(AuthUserDeleteResponse {
            header: self.header(),
        }))
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        self.shared().auth.admin(request.metadata())?;
        let r = request.into_inner();
        let op = AdminOp::UserChangePassword {
            name: r.name,
            password_hash: hash_password(r.password).await,
        };
        request_op(self.shared(), op).await?;
        Ok(Response::new(AuthUserChangePasswordResponse {
            header: self.header(),
        }))
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let r = request.get_ref();
        let op = AdminOp::UserGrantRole {
            user: r.user.clone(),
            role: r.role.clone(),
        };
        self.manage(&request, op).await?;
        Ok(Response::new(AuthUserGrantRoleResponse {
            header: self.header(),
        }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let r = request.get_ref();
        let op = AdminOp::UserRevokeRole {
            name: r.name.clone(),
            role: r.role.clone(),
        };
        self.manage(&request, op).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse {
            header: self.header(),
        }))
    }

    async fn role_add(
        &self,
        request: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let name = request.get_ref().name.clone();
        self.manage(&request, AdminOp::RoleAdd { name }).await?;
        Ok(Response::new(AuthRoleAddResponse {
            header: self.header(),
        }))
    }

    /// The root role answers one READWRITE permission over every key, as etcd's RoleGet.
    async fn role_get(
        &self,
        request: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let role = &request.get_ref().role;
        let auth = &self.shared().auth;
        self.may_read(&request, |user| auth.state().has_role(user, role))?;
        let state = auth.state();
        let perms = &state.role(role)?.perms;
        let perm = match role == ROOT_ROLE {
            true => vec![Permission {
                perm_type: i32::from(PERM_READWRITE),
                key: Vec::new(),
                range_end: vec![0],
            }],
            false => perms
                .iter()
                .map(|p| Permission {
                    perm_type: i32::from(p.perm_type),
                    key: p.key.clone(),
                    range_end: p.range_end.clone(),
                })
                .collect(),
        };
        drop(state);
        Ok(Response::new(AuthRoleGetResponse {
            header: self.header(),
            perm,
        }))
    }

    async fn role_list(
        &self,
        request: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        self.shared().auth.admin(request.metadata())?;
        let roles = self.shared().auth.state().role_names();
        Ok(Response::new(AuthRoleListResponse {
            header: self.header(),
            roles,
        }))
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let name = request.get_ref().role.clone();
        self.manage(&request, AdminOp::RoleDelete { name }).await?;
        Ok(Response::new(AuthRoleDeleteResponse {
            header: self.header(),
        }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let r = request.get_ref();
        let op = AdminOp::RoleGrantPermission {
            name: r.name.clone(),
            perm: stored_perm(r.perm.clone())?,
        };
        self.manage(&request, op).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse {
            header: self.header(),
        }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let r = request.get_ref();
        let op = AdminOp::RoleRevokePermission {
            role: r.role.clone(),
            key: r.key.clone(),
            range_end: r.range_end.clone(),
        };
        self.manage(&request, op).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse {
            header: self.header(),
        }))
    }
}
